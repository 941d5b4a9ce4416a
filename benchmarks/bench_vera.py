"""VeRA linear layer: ``lowrank.VeRALinear`` vs a frozen ``nn.Linear`` vs PEFT's VeRA ``Linear``.

    y = x Wᵀ + b ⊙ (B_s (d ⊙ (A_s x)))    x: [M, K], W: [N, K] frozen, A_s = A[:r, :K], B_s = B[:N, :r]

The three peers share one base ``nn.Linear`` (no bias, as in Llama's projections) and the two VeRA
layers hold the same adapter: one shared projection pair drawn as PEFT draws it (key 0) for
[r, 11008] / [11008, r], so every shape reads a slice (as in a model with several layer sizes), and
the same random d and b (b not zero, so the adapter term is not skipped by luck). Everything is in the
case's dtype, as after ``model.to(dtype)``. ``nn.Linear`` is the floor: an adapted layer cannot do
less than the frozen base, and below it the fused kernel's advantage over torch's GEMM shows.

Modes:
- ``forward``: layer in eval mode, under ``torch.no_grad()``.
- ``forward_backward``: forward, then ``torch.autograd.grad`` of y against a fixed random grad_y,
  for x and the trainable vectors d and b (nn.Linear: x only, its weight is frozen). Grads are
  returned, not accumulated into ``.grad``, so every call does the same work.

Each (shape, M, dtype, mode) is a pytest-benchmark group with the three peers side by side;
``extra_info`` holds ``flops`` and ``bytes`` (the base weight bytes read: once forward, twice
forward+backward) to read the times as GFLOP/s or GB/s. ``test_vera_interleaved`` times the peers
of a group interleaved and fills the summary table printed at the end (ratios are lowrank's time
over the peer's: below 1 is faster). Every full-size weight (32 MiB and up) is larger than the
16 MiB L3, so each call reads W from memory; no cold-cache cycling of copies is needed.

    pytest benchmarks/bench_vera.py                                   # full suite
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_vera.py -q          # CI: one call each, small shapes
    pytest benchmarks/bench_vera.py -k "interleaved and 4096x11008 and r256 and M512- and backward"

PEFT is optional (``pip install .[peers]``); without it its cases are skipped and its columns read "—".

A peer whose call is estimated over ``CALL_LIMIT_S`` is not run (skipped, "—" in the table, with a
note). This is torch's bf16 backward on CPUs without AVX512-BF16/AMX: ``grad_y @ W`` takes 89 s per
call at 4096x4096, M=512 here. The estimate is one warm one-token call
times M, an upper bound for a GEMM up to cache effects; quick mode skips it.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import lowrank

from ._report import dtype_label
from ._peers import ADAPTER_COLUMNS, add_adapter_row, benchmark_peer, interleaved, timed_call
from ._peers import available as _available
from ._timing import QUICK

RANKS = [16, 256]
D_STD = 0.1  # d ~ N(0.1, 0.1), b ~ N(0, 0.01): the adapter changes y without swamping it
B_STD = 0.01
SHAPES = [(256, 384)] if QUICK else [(4096, 4096), (4096, 11008)]  # (in, out)
MAX_FEATURES = 384 if QUICK else 11008  # the shared projections' size: every shape takes a slice
TOKENS = [1, 16, 64] if QUICK else [1, 16, 512]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "forward_backward"]
PEERS = ["nn.Linear", "lowrank", "peft"]  # nn.Linear first: the ratios' baseline


@dataclasses.dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    tokens: int
    rank: int
    dtype: torch.dtype
    mode: str

    def __str__(self) -> str:  # the test id; "M1-" selects M=1 without M=16 under -k
        shape = f"{self.in_features}x{self.out_features}"
        return f"{shape}-M{self.tokens}-r{self.rank}-{dtype_label(self.dtype)}-{self.mode}"

    @property
    def group(self) -> str:
        mode = self.mode.replace("_", "+")
        shape = f"{self.in_features}x{self.out_features}"
        return f"{shape} M={self.tokens} r={self.rank} {dtype_label(self.dtype)} {mode}"

    def work(self, peer: str) -> dict[str, int]:
        """Model FLOPs and weight bytes (W and the projection slices) one call of ``peer`` needs."""
        m, k, n, r = self.tokens, self.in_features, self.out_features, self.rank
        base = 2 * m * k * n  # x Wᵀ; backward: grad_y W, the same again
        adapter = 0 if peer == "nn.Linear" else 2 * m * r * (k + n)  # h = x A_sᵀ, u B_sᵀ
        weight_bytes = (k * n + (0 if peer == "nn.Linear" else r * (k + n))) * self.dtype.itemsize
        if self.mode == "forward":
            return {"flops": base + adapter, "bytes": weight_bytes}
        # Backward of the adapter: g' = (dy ⊙ b) B_s, grad_b's dyᵀu · B_s, g A_s into grad_x.
        return {"flops": 2 * base + 3 * adapter, "bytes": 2 * weight_bytes}


CASES = [
    Case(k, n, m, r, dtype, mode)
    for (k, n) in SHAPES
    for m in TOKENS
    for r in RANKS
    for dtype in DTYPES
    for mode in MODES
]


def peft_vera_linear(base: nn.Linear, vera_a: torch.Tensor, vera_b: torch.Tensor, r: int) -> nn.Module:
    """PEFT's VeRA layer around ``base`` (adapter "default", dropout 0) over the given projections."""
    from peft import VeraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera.layer import Linear

    config = VeraConfig(r=r, vera_dropout=0.0)
    projections = BufferDict({"default": vera_a}), BufferDict({"default": vera_b})
    if "config" in inspect.signature(Linear.__init__).parameters:  # newer PEFT takes the config
        return Linear(base, *projections, "default", config=config, r=r)
    return Linear(base, *projections, "default", r=r, vera_dropout=0.0)


def build_peers(case: Case, with_peft: bool) -> dict[str, nn.Module]:
    """The peers over one shared frozen base weight; both VeRA layers hold the same adapter."""
    torch.manual_seed(0)
    base = nn.Linear(case.in_features, case.out_features, bias=False, dtype=case.dtype).requires_grad_(False)
    vera_a, vera_b = lowrank.vera_shared_projections(case.rank, MAX_FEATURES, MAX_FEATURES, dtype=case.dtype)
    vera = lowrank.VeRALinear.from_linear(base, r=case.rank, projections=(vera_a, vera_b))
    with torch.no_grad():
        vera.vera_lambda_d.normal_(0.1, D_STD)
        vera.vera_lambda_b.normal_(0.0, B_STD)
    peers = {"nn.Linear": base, "lowrank": vera}
    if with_peft:
        peft_layer = peft_vera_linear(base, vera_a, vera_b, case.rank).to(case.dtype)
        with torch.no_grad():
            peft_layer.vera_lambda_d["default"].copy_(vera.vera_lambda_d)
            peft_layer.vera_lambda_b["default"].copy_(vera.vera_lambda_b)
        peers["peft"] = peft_layer
    return peers


@pytest.mark.parametrize("case, peer", [(c, p) for c in CASES for p in PEERS], ids=str)
def test_vera(benchmark, case: Case, peer: str):
    if peer == "peft":
        pytest.importorskip("peft")
    benchmark_peer(benchmark, case, build_peers(case, with_peft=peer == "peft")[peer], peer, rank=case.rank)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vera_interleaved(case: Case, summary_tables):
    median, rounds, too_slow = interleaved(case, build_peers(case, with_peft=_available("peft")))
    table = summary_tables.table(f"VeRA linear, {torch.get_num_threads()} threads: ms per call (interleaved medians)", ADAPTER_COLUMNS)
    add_adapter_row(table, case, median, rounds, too_slow)


@pytest.mark.parametrize("mode", MODES)
def test_peers_compute_the_same_layer(mode: str):
    """The comparison is fair only if the peers compute one function: check it on a small case."""
    case = Case(64, 96, 5, 8, torch.float32, mode)
    peers = build_peers(case, with_peft=_available("peft"))
    outputs = {name: timed_call(case, layer)() for name, layer in peers.items()}  # y, or the grads
    if "peft" in outputs:
        torch.testing.assert_close(outputs["lowrank"], outputs["peft"], rtol=1e-5, atol=1e-5)
    # The adapter must change the result, or VeRA would be timed as nn.Linear in disguise.
    y_or_grad_x = {name: out if mode == "forward" else out[0] for name, out in outputs.items()}
    assert not torch.allclose(y_or_grad_x["nn.Linear"], y_or_grad_x["lowrank"])
