"""Fused row kernel vs GEMM path of ``lora_linear_forward``, by token count M: where they cross.

``lowrank.ops.lora.lora_linear_forward`` takes the fused row kernel (W streamed once per 64 token
rows, adapter added in the same pass) for M <= ``_runtime.cpu_fused_max_m(dtype)`` and the GEMM
path (base GEMM, adapter ``addmm``-ed into its output) above. This file forces each path in turn by
setting that limit to 0 (GEMM) or to the largest M measured (fused), times the two interleaved at
every M, and prints the table with the crossover per dtype: the smallest M from which the GEMM path
is faster at every larger M measured. The limit lowrank uses is measured on first use by a shorter
probe (``lowrank/ops/_dispatch.py``, shown by ``python -m lowrank info``); this table is the long
check of it on a real layer size. Medians within TIE_TOLERANCE of each other count as a tie, not a
win: that is the noise between interleaved runs.

    pytest benchmarks/bench_crossover.py                         # 4096x11008, r=16, fp32 and bf16
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_crossover.py   # tiny shape, one call each
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from lowrank.ops import _runtime
from lowrank.ops.lora import lora_linear_forward

from ._report import dtype_label, format_ms, format_ratio
from ._timing import QUICK, interleaved_medians, interleaved_rounds

RANK = 16
SCALE = 2.0  # alpha / r = 32 / 16
IN_FEATURES, OUT_FEATURES = (256, 384) if QUICK else (4096, 11008)
TOKENS = [1, 16, 64, 96] if QUICK else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
PATH_LIMITS = {"fused": max(TOKENS), "gemm": 0}  # the CPU_FUSED_MAX_M that forces each path
# One call timed against itself, interleaved (4096x11008, fp32/bf16, M = 1, 16, 64, 3 runs each):
# the two medians differed by up to 2.5%. A tie is anything within twice that.
TIE_TOLERANCE = 0.05


def faster_path(fused_s: float, gemm_s: float) -> str:
    if abs(fused_s / gemm_s - 1.0) < TIE_TOLERANCE:
        return "tie"
    return "fused" if fused_s < gemm_s else "GEMM"


def crossover(verdicts: dict[int, str]) -> Optional[int]:
    """The smallest M from which GEMM wins at every larger M measured; None if it never does."""
    first = None
    for tokens in sorted(verdicts):
        if verdicts[tokens] != "GEMM":
            first = None
        elif first is None:
            first = tokens
    return first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_label)
def test_fused_vs_gemm_crossover(dtype: torch.dtype, monkeypatch, summary_tables):
    configured_limit = _runtime.cpu_fused_max_m(dtype)
    # Pin a per-dtype limit for this test (restored after it); the timed calls then set it per path.
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {dtype: configured_limit})
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=generator)).to(dtype)

    weight = randn(OUT_FEATURES, IN_FEATURES, std=IN_FEATURES**-0.5)
    lora_a = randn(RANK, IN_FEATURES, std=IN_FEATURES**-0.5)
    lora_b = randn(OUT_FEATURES, RANK, std=0.01)

    def forward_on_path(x: torch.Tensor, path: str):
        def forward():
            _runtime.CPU_FUSED_MAX_M[dtype] = PATH_LIMITS[path]
            return lora_linear_forward(x, weight, None, lora_a, lora_b, SCALE, None)

        return forward

    table = summary_tables.table(
        f"lora_linear_forward {IN_FEATURES}x{OUT_FEATURES}, r={RANK}, {torch.get_num_threads()} threads: "
        "fused row kernel vs GEMM path, ms per call (interleaved medians)",
        ("dtype", "M", "fused", "GEMM", "fused/GEMM", "faster", "rounds"),
    )
    verdicts = {}
    with torch.no_grad():
        for tokens in TOKENS:
            x = randn(tokens, IN_FEATURES)
            calls = {path: forward_on_path(x, path) for path in PATH_LIMITS}
            rounds = interleaved_rounds(calls)
            median = interleaved_medians(calls, rounds)
            verdicts[tokens] = faster_path(median["fused"], median["gemm"])
            table.add_row(dtype_label(dtype), str(tokens), format_ms(median["fused"]), format_ms(median["gemm"]),
                          format_ratio(median["fused"], median["gemm"]), verdicts[tokens], str(rounds))

    crossover_m = crossover(verdicts)
    gemm_wins = [tokens for tokens, faster in verdicts.items() if faster == "GEMM"]
    if crossover_m is not None:
        verdict = f"the GEMM path is faster from M = {crossover_m} on"
    elif gemm_wins:
        verdict = f"no crossover up to M = {max(TOKENS)}; the GEMM path is faster only at M = {gemm_wins}"
    else:
        verdict = f"the fused kernel is faster or tied at every M measured, up to {max(TOKENS)}"
    table.notes.append(f"{dtype_label(dtype)}: {verdict} (configured CPU_FUSED_MAX_M: {configured_limit})")
