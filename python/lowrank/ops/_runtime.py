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


# Largest token count M that takes the CPU fused row kernels; above it the GEMM path runs.
# Measured here (AMD EPYC, AVX2, 2 threads, 4096 -> 11008, r=16, interleaved medians,
# benchmarks/bench_crossover.py): the fused kernel beats torch's MKL GEMM at every M measured,
# fp32 13.7 vs 52.2 ms at M=16, 40.6 vs 93.6 at M=64, 317 vs 386 at M=512; bf16 (against the
# tile-widened fp32 GEMM) 14.8 vs 22.0 at M=16, 326 vs 388 at M=512. So on AVX2 there is no
# crossover. The AVX-512 and portable variants were not measured (no AVX-512 CPU here); they keep
# the fused path to M <= 64, the few-token regime it was written for.
_UNBOUNDED = 1 << 62
CPU_FUSED_MAX_M_BY_ISA = {"avx2": _UNBOUNDED, "avx512": 64, "portable": 64}
# Tests and benchmarks may pin a limit for every variant: {dtype: max M}; None uses the table above.
CPU_FUSED_MAX_M = None


def cpu_fused_max_m(dtype: torch.dtype) -> int:
    if CPU_FUSED_MAX_M is not None:
        return CPU_FUSED_MAX_M[dtype]
    from .. import _C

    return CPU_FUSED_MAX_M_BY_ISA.get(_C.cpu_isa(), 64)


# CUDA: one warp per output row re-reads W once per 8 x rows; above ~16 rows cuBLAS should win
# (not yet measured on a GPU).
CUDA_FUSED_MAX_M = 16

# Largest M for the CPU few-token input-gradient kernel (dx = dy W + g A, W streamed by rows).
# Measured as above: kernel vs torch GEMM (tile-widened for bf16), fp32 23.0 vs 33.3 ms at M=16,
# 39.1 vs 37.2 at 24, 42.2 vs 42.8 at 32, 64.2 vs 53.3 at 48; bf16 34.8 vs 36.8 at 24,
# 43.5 vs 40.5 at 32. Crossover ~24-32.
CPU_INPUT_GRAD_MAX_M = 24

# NF4: largest M for the fused dequant-GEMV rows kernel (csrc/cpu/nf4.cpp); above it W is dequantized
# tile by tile into an fp32 workspace for torch's GEMM. Tests and benchmarks may pin it
# (NF4_CPU_FUSED_MAX_M). Measured here (AVX2, 2 threads, 4096 -> 11008, fp32, medians of 5):
# fused vs tiled GEMM 42.7 vs 49.9 ms at M=64, 79.7 vs 91.0 at 128, 162 vs 180 at 256, 379 vs 359
# at 512. The AVX-512 and portable variants were not measured.
NF4_CPU_FUSED_MAX_M_BY_ISA = {"avx2": 256, "avx512": 64, "portable": 4}
NF4_CPU_FUSED_MAX_M = None


def nf4_cpu_fused_max_m() -> int:
    if NF4_CPU_FUSED_MAX_M is not None:
        return NF4_CPU_FUSED_MAX_M
    from .. import _C

    return NF4_CPU_FUSED_MAX_M_BY_ISA.get(_C.cpu_isa(), 4)

# NF4: largest M for the few-token input-gradient kernel (dx = dy W, W decoded in registers and
# streamed once); above it W is dequantized tile by tile for torch's GEMM. Measured as above:
# kernel vs tiled GEMM 4.0 vs 8.9 ms at M=1, 8.2 vs 20.4 at 4, 19.8 vs 41.0 at 8, 56.2 vs 47.3 at 12
# (the M x K fp32 partial sums outgrow L2).
NF4_CPU_INPUT_GRAD_MAX_M = 8
