"""LoRA linear layer: ``lowrank.LoRALinear`` vs a frozen ``nn.Linear`` vs PEFT's LoRA ``Linear``.

    y = x Wᵀ + s · (x Aᵀ) Bᵀ        x: [M, K], W: [N, K] frozen, A: [r, K], B: [N, r], s = alpha / r

The three peers share one base ``nn.Linear`` (no bias, as in Llama's projections) and the two LoRA
layers hold the same adapter (r=16, alpha=32, no dropout, B set to small random values so the
adapter term is not zero). ``nn.Linear`` is the floor: a LoRA layer cannot beat the frozen base.

Modes:
- ``forward``: layer in eval mode, under ``torch.no_grad()``.
- ``forward_backward``: forward, then ``torch.autograd.grad`` of y against a fixed random grad_y,
  for x and the trainable adapter factors (nn.Linear: x only, its weight is frozen). Grads are
  returned, not accumulated into ``.grad``, so every call does the same work.

Each (shape, M, dtype, mode) is a pytest-benchmark group with the three peers side by side;
``extra_info`` holds ``flops`` and ``bytes`` (the base weight bytes read: once forward, twice
forward+backward) to read the times as GFLOP/s or GB/s. ``test_lora_interleaved`` times the peers
of a group interleaved and fills the summary table printed at the end (ratios are lowrank's time
over the peer's: below 1 is faster). Every full-size weight (32 MiB and up) is larger than the
16 MiB L3, so each call reads W from memory; no cold-cache cycling of copies is needed.

    pytest benchmarks/bench_lora.py                                   # full suite
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/ -q                       # CI: one call each, small shapes
    pytest benchmarks/bench_lora.py -k "4096x11008 and fp32 and forward and not backward and (M1- or M16-)"

PEFT is optional (``pip install .[peers]``); without it its cases are skipped and its columns read "—".

A peer whose call is estimated over ``CALL_LIMIT_S`` is not run (skipped, "—" in the table, with a
note). This is torch's bf16 backward on CPUs without AVX512-BF16/AMX: ``grad_y @ W`` takes 89 s per
call at 4096x4096, M=512 here, against 1.2 s for lowrank. The estimate is one warm one-token call
times M, an upper bound for a GEMM up to cache effects; quick mode skips it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lowrank

from ._report import dtype_label
from ._peers import ADAPTER_COLUMNS, add_adapter_row, benchmark_peer, interleaved, peft_lora_layer, timed_call
from ._peers import available as _available
from ._timing import QUICK

RANK = 16
ALPHA = 32
LORA_B_STD = 0.01  # small random B: the adapter changes y without swamping it
SHAPES = [(256, 384)] if QUICK else [(4096, 4096), (4096, 11008)]  # (in, out)
TOKENS = [1, 16, 64] if QUICK else [1, 16, 512]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "forward_backward"]
PEERS = ["nn.Linear", "lowrank", "peft"]  # nn.Linear first: the ratios' baseline


@dataclasses.dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    tokens: int
    dtype: torch.dtype
    mode: str

    def __str__(self) -> str:  # the test id; "M1-" selects M=1 without M=16 under -k
        return f"{self.in_features}x{self.out_features}-M{self.tokens}-{dtype_label(self.dtype)}-{self.mode}"

    @property
    def group(self) -> str:
        mode = self.mode.replace("_", "+")
        return f"{self.in_features}x{self.out_features} M={self.tokens} {dtype_label(self.dtype)} {mode}"

    def work(self, peer: str) -> dict[str, int]:
        """Model FLOPs and base-weight bytes one call of ``peer`` needs (nn.Linear has no adapter)."""
        m, k, n, r = self.tokens, self.in_features, self.out_features, RANK
        base = 2 * m * k * n  # x Wᵀ; backward: grad_y W, the same again
        adapter = 0 if peer == "nn.Linear" else 2 * m * r * (k + n)  # u = x Aᵀ, u Bᵀ
        weight_bytes = k * n * self.dtype.itemsize
        if self.mode == "forward":
            return {"flops": base + adapter, "bytes": weight_bytes}
        # Backward of the adapter: grad_B, g = grad_y B, grad_A, g A into grad_x: twice its forward.
        return {"flops": 2 * base + 3 * adapter, "bytes": 2 * weight_bytes}


CASES = [
    Case(k, n, m, dtype, mode) for (k, n) in SHAPES for m in TOKENS for dtype in DTYPES for mode in MODES
]


def peft_lora_linear(base: nn.Linear) -> nn.Module:
    """PEFT's LoRA layer around ``base`` (adapter "default", dropout 0, PEFT's default init)."""
    from peft.tuners.lora.layer import Linear

    return peft_lora_layer(Linear, base, RANK, ALPHA)


def build_peers(case: Case, with_peft: bool) -> dict[str, nn.Module]:
    """The peers over one shared frozen base weight; both LoRA layers hold the same adapter."""
    torch.manual_seed(0)
    base = nn.Linear(case.in_features, case.out_features, bias=False, dtype=case.dtype).requires_grad_(False)
    lora = lowrank.LoRALinear.from_linear(base, r=RANK, alpha=ALPHA)
    with torch.no_grad():
        lora.lora_B.weight.normal_(0.0, LORA_B_STD)
    peers = {"nn.Linear": base, "lowrank": lora}
    if with_peft:
        peft_layer = peft_lora_linear(base).to(case.dtype)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(lora.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(lora.lora_B.weight)
        peers["peft"] = peft_layer
    return peers


@pytest.mark.parametrize("case, peer", [(c, p) for c in CASES for p in PEERS], ids=str)
def test_lora(benchmark, case: Case, peer: str):
    if peer == "peft":
        pytest.importorskip("peft")
    benchmark_peer(benchmark, case, build_peers(case, with_peft=peer == "peft")[peer], peer, rank=RANK)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lora_interleaved(case: Case, summary_tables):
    median, rounds, too_slow = interleaved(case, build_peers(case, with_peft=_available("peft")))
    table = summary_tables.table(f"LoRA linear, r={RANK}, {torch.get_num_threads()} threads: ms per call (interleaved medians)", ADAPTER_COLUMNS)
    add_adapter_row(table, case, median, rounds, too_slow)


@pytest.mark.parametrize("mode", MODES)
def test_peers_compute_the_same_layer(mode: str):
    """The comparison is fair only if the peers compute one function: check it on a small case."""
    case = Case(64, 96, 5, torch.float32, mode)
    peers = build_peers(case, with_peft=_available("peft"))
    outputs = {name: timed_call(case, layer)() for name, layer in peers.items()}  # y, or the grads
    if "peft" in outputs:
        torch.testing.assert_close(outputs["lowrank"], outputs["peft"], rtol=1e-5, atol=1e-5)
    # The adapter must change the result, or LoRA would be timed as nn.Linear in disguise.
    y_or_grad_x = {name: out if mode == "forward" else out[0] for name, out in outputs.items()}
    assert not torch.allclose(y_or_grad_x["nn.Linear"], y_or_grad_x["lowrank"])
