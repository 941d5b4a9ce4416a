"""NF4 / QLoRA: ``lowrank.NF4Linear`` and ``lowrank.QLoRALinear`` against their peers, plus NF4
quantization speed and the peak memory of a training step.

Peers, all over the same weight (no bias, as in Llama's projections):

- ``nn.Linear``: the dense layer in the same dtype (frozen), the baseline a 4-bit layer should match
  when many tokens make it compute-bound and beat when few tokens make it memory-bound;
- ``lowrank``: ``NF4Linear`` (forward tables) or ``QLoRALinear`` (forward+backward tables; r=16);
- ``bnb``: bitsandbytes ``Linear4bit`` (nf4, double quantization). Forward runs it in eval mode under
  ``no_grad``; there it uses its packed CPU kernel where the CPU has AVX512-BF16, else its default
  path (dequantize, then matmul). Forward+backward is its training path;
- ``peft+bnb``: PEFT's LoRA on that ``Linear4bit`` (QLoRA as people run it today; forward+backward);
- ``torchao``: torchao's NF4Tensor as a linear weight, where torchao is installed.

``test_qlora_interleaved`` times the peers of a group interleaved (benchmarks/_timing.py) and fills a
summary table; ratios are lowrank's time over the peer's (below 1: lowrank is faster). Peers
estimated over CALL_LIMIT_S per call are skipped (benchmarks/_peers.py; torch's bf16 GEMMs on CPUs
without AVX512-BF16/AMX), the estimate taken from an M=16 call because bitsandbytes' cost is mostly
dequantization, which does not grow with M. ``test_quantize`` times NF4 quantization of a 4096x11008 fp32 weight
against bitsandbytes' ``quantize_4bit``; ``test_training_step_memory`` measures peak memory of one
training step in fresh processes (benchmarks/_memory_step.py).

    pytest benchmarks/bench_qlora.py
    pytest benchmarks/bench_qlora.py -k "interleaved and 4096x11008 and M1-"
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank

from ._report import dtype_label, format_ms, format_ratio
from ._peers import available as has
from ._peers import interleaved, peft_lora_layer, timed_call, too_slow_note
from ._timing import QUICK, benchmark_within_budget, interleaved_medians, interleaved_rounds

RANK = 16
ALPHA = 32
SHAPES = [(256, 384)] if QUICK else [(4096, 4096), (4096, 11008)]  # (in, out)
TOKENS = [1, 16, 64] if QUICK else [1, 16, 512]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "forward_backward"]


@dataclasses.dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    tokens: int
    dtype: torch.dtype
    mode: str

    def __str__(self) -> str:
        return f"{self.in_features}x{self.out_features}-M{self.tokens}-{dtype_label(self.dtype)}-{self.mode}"

    @property
    def group(self) -> str:
        return f"{self.in_features}x{self.out_features} M={self.tokens} {dtype_label(self.dtype)} {self.mode.replace('_', '+')}"


CASES = [Case(k, n, m, dt, mode) for (k, n) in SHAPES for m in TOKENS for dt in DTYPES for mode in MODES]


def _bnb_linear4bit(dense: nn.Linear, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype,
                          compress_statistics=True, quant_type="nf4")  # fmt: skip
    q.load_state_dict({"weight": dense.weight.detach().float()})
    q = q.to("cpu")  # quantizes
    return q.requires_grad_(False)


class _TorchaoNF4Linear(nn.Module):
    def __init__(self, dense: nn.Linear, dtype: torch.dtype):
        super().__init__()
        from torchao.dtypes.nf4tensor import to_nf4

        self.weight = nn.Parameter(to_nf4(dense.weight.detach().to(dtype)), requires_grad=False)

    def forward(self, x):
        from torchao.dtypes.nf4tensor import linear_nf4

        return linear_nf4(x, self.weight)


def build_peers(case: Case) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense32 = nn.Linear(case.in_features, case.out_features, bias=False).requires_grad_(False)
    dense = nn.Linear(case.in_features, case.out_features, bias=False, dtype=case.dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(dense32.weight)
    peers: dict[str, nn.Module] = {"nn.Linear": dense}
    training = case.mode == "forward_backward"
    if training:
        q = lowrank.QLoRALinear.from_linear(dense32, r=RANK, alpha=ALPHA, compute_dtype=case.dtype)
        with torch.no_grad():
            q.lora_B.weight.normal_(0.0, 0.01)
        peers["lowrank"] = q
    else:
        peers["lowrank"] = lowrank.NF4Linear.from_linear(dense32, compute_dtype=case.dtype)
    if has("bitsandbytes"):
        base4 = _bnb_linear4bit(dense32, case.dtype)
        if training and has("peft"):
            from peft.tuners.lora.bnb import Linear4bit

            layer = peft_lora_layer(Linear4bit, base4, RANK, ALPHA)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(peers["lowrank"].lora_A.weight.float())
                layer.lora_B["default"].weight.copy_(peers["lowrank"].lora_B.weight.float())
            peers["peft+bnb"] = layer
        elif not training:
            peers["bnb"] = base4
    if not training and has("torchao"):
        try:
            peers["torchao"] = _TorchaoNF4Linear(dense32, case.dtype)
        except Exception:  # torchao versions differ; a peer that cannot be built is left out
            pass
    return peers


PEER_COLUMNS = ("nn.Linear", "lowrank", "bnb", "peft+bnb", "torchao")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_qlora_interleaved(case: Case, summary_tables):
    # bitsandbytes' time is mostly dequantizing the whole weight, not growing with M: probe at M=16
    median, rounds, too_slow = interleaved(case, build_peers(case), probe_tokens=16)
    mine = median.get("lowrank")
    table = summary_tables.table(
        f"NF4 / QLoRA (lowrank = NF4Linear forward, QLoRALinear r={RANK} forward+backward), "
        f"{torch.get_num_threads()} threads: ms per call (interleaved medians)",
        ("group",) + PEER_COLUMNS + ("lowrank/nn.Linear", "lowrank/bnb", "lowrank/peft+bnb", "rounds"),
    )
    table.add_row(
        case.group,
        *(format_ms(median.get(p)) for p in PEER_COLUMNS),
        format_ratio(mine, median.get("nn.Linear")),
        format_ratio(mine, median.get("bnb")),
        format_ratio(mine, median.get("peft+bnb")),
        str(rounds),
    )
    if too_slow:
        table.notes.append(too_slow_note(case.group, too_slow))
    assert mine is not None


@pytest.mark.parametrize("mode", MODES)
def test_peers_compute_the_same_layer(mode: str):
    """A fair comparison needs one function: check the 4-bit peers agree on a small case."""
    case = Case(128, 96, 5, torch.float32, mode)
    peers = build_peers(case)
    outputs = {name: timed_call(case, layer)() for name, layer in peers.items() if name != "nn.Linear"}
    # The oracle is the exact decode of the NF4 weight (the bytes every peer shares) in float64, not a peer:
    # on CPUs with AVX512-BF16, bitsandbytes' packed CPU kernel computes with bf16 scales and products.
    exact = _float64_call(case, peers["lowrank"])
    for name, got in outputs.items():
        got = got if isinstance(got, (tuple, list)) else (got,)
        # lowrank: fp32 rounding. A peer: the same layer, at worst at bf16 precision (bitsandbytes' packed
        # kernel rounds x and the scales to bf16: 4e-3 of the output's scale at K=128 on a Zen 4)
        tol = 1e-5 if name == "lowrank" else 2.0**-6
        for g, e in zip(got, exact, strict=True):
            torch.testing.assert_close(g.double(), e, rtol=0, atol=tol * e.abs().max().item(), msg=name)


def _float64_call(case: Case, layer) -> tuple:
    """What ``timed_call(case, layer)`` returns, computed in float64 from the exactly decoded NF4 weight
    (and the LoRA factors): ``(y,)`` for a forward, the gradients for x and the factors otherwise."""
    generator = torch.Generator().manual_seed(1)  # the inputs timed_call draws
    x = torch.randn(case.tokens, case.in_features, generator=generator).to(case.dtype).double()
    w = layer.dequantize(torch.float32).double()
    if case.mode == "forward":
        return (x @ w.t(),)
    grad_y = torch.randn(case.tokens, case.out_features, generator=generator).to(case.dtype).double()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    x.requires_grad_()
    y = x @ w.t() + layer.scaling * (x @ a.t()) @ b.t()
    return torch.autograd.grad(y, (x, a, b), grad_y)  # x, then the factors in name order (A, B)


# ---------------------------------------------------------------------------------------------
# Quantization speed
# ---------------------------------------------------------------------------------------------
QUANT_SHAPE = (384, 256) if QUICK else (11008, 4096)


@pytest.mark.parametrize("peer", ["lowrank", "bnb"])
def test_quantize(benchmark, peer):
    torch.manual_seed(0)
    w = torch.randn(*QUANT_SHAPE)
    if peer == "lowrank":
        fn = lambda: lowrank.quantize_nf4(w, 64, True)  # noqa: E731
    else:
        bnbF = pytest.importorskip("bitsandbytes.functional")
        fn = lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")  # noqa: E731
    benchmark.group = f"NF4 quantize {QUANT_SHAPE[0]}x{QUANT_SHAPE[1]} fp32"
    benchmark_within_budget(benchmark, fn)


def test_quantize_interleaved(summary_tables):
    torch.manual_seed(0)
    w = torch.randn(*QUANT_SHAPE)
    calls = {"lowrank": lambda: lowrank.quantize_nf4(w, 64, True)}
    if has("bitsandbytes"):
        import bitsandbytes.functional as bnbF

        calls["bnb"] = lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    median = interleaved_medians(calls, interleaved_rounds(calls))
    table = summary_tables.table("NF4 quantization (blocksize 64, double quantization): ms per call",
                                 ("weight", "lowrank", "bnb", "lowrank/bnb"))  # fmt: skip
    table.add_row(f"{QUANT_SHAPE[0]}x{QUANT_SHAPE[1]} fp32", format_ms(median["lowrank"]), format_ms(median.get("bnb")),
                  format_ratio(median["lowrank"], median.get("bnb")))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Peak memory of one training step
# ---------------------------------------------------------------------------------------------
MEMORY_METHODS = ["full", "lora", "peft-lora", "qlora", "peft-qlora"]


MEMORY_WIDTH, MEMORY_TOKENS = (256, 64) if QUICK else (4096, 512)


def _memory(method: str) -> dict:
    width, tokens = MEMORY_WIDTH, MEMORY_TOKENS
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks._memory_step", "--method", method, "--width", str(width),
         "--tokens", str(tokens)],  # fmt: skip
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_step_memory(summary_tables):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (VmHWM)")
    results = {}
    for method in MEMORY_METHODS:
        if method.startswith("peft") and not has("peft"):
            continue
        if method == "peft-qlora" and not has("bitsandbytes"):
            continue
        results[method] = _memory(method)
    full = results["full"]["peak_mb"]
    table = summary_tables.table(
        f"Peak memory of one training step (4 x Linear({MEMORY_WIDTH}, {MEMORY_WIDTH}), M={MEMORY_TOKENS}, fp32, "
        "AdamW), MB above the baseline",
        ("method", "peak MB", "model MB", "trainable", "/ full", "/ peer"),
    )
    peer_of = {"lora": "peft-lora", "qlora": "peft-qlora"}
    for method, r in results.items():
        peer = results.get(peer_of.get(method, ""), {}).get("peak_mb")
        table.add_row(method, f"{r['peak_mb']:.0f}", f"{r['model_mb']:.0f}", str(r["trainable"]),
                      f"{r['peak_mb'] / full:.3f}", format_ratio(r["peak_mb"], peer))  # fmt: skip
