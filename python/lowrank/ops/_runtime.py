"""Run-time settings the op kernels share: thread count, output poisoning for tests, the
few-token/many-token crossovers."""

from __future__ import annotations

import os

import torch

# Tests set this (tests/conftest.py) so every output a native kernel writes starts as NaN:
# an element the kernel forgets to write then fails the comparison instead of passing by luck.
poison_outputs = os.environ.get("LOWRANK_POISON_OUTPUTS", "0") == "1"


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, filled with NaN when ``poison_outputs`` is on."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if poison_outputs:
        t.fill_(float("nan"))
    return t


def num_threads() -> int:
    """As many threads as torch itself uses for intra-op work (never more)."""
    return max(1, torch.get_num_threads())


# Largest token count M that takes the fused row kernels; above it the GEMM path wins.
# Measured with benchmarks/bench_crossover.py (4096 -> 11008, 2 threads, this CPU, see README):
# fp32: fused beats MKL up to M = 64 (the kernel's limit); bf16: fused wins at every M <= 64.
CPU_FUSED_MAX_M = {torch.float32: 64, torch.bfloat16: 64}
# CUDA: one warp per output row re-reads w per 8 x rows; cuBLAS wins above ~16 rows.
CUDA_FUSED_MAX_M = 16

# Largest M for the CPU few-token input-gradient kernel (dx = dy W + g A streaming W by rows).
CPU_INPUT_GRAD_MAX_M = 64
