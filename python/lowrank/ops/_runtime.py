"""Run-time settings the op kernels share: thread count, output poisoning for tests, the
few-token/many-token crossovers."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import _dispatch

# Tests set this (tests/conftest.py) so every output a native kernel writes starts as NaN:
# an element the kernel forgets to write then fails the comparison instead of passing by luck.
poison_outputs = os.environ.get("LOWRANK_POISON_OUTPUTS", "0") == "1"


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, filled with NaN when ``poison_outputs`` is on."""
    t = torch.empty(*shape, dtype=dtype, device=device)  # (unpacked: a shape tuple costs ~0.4 µs more)
    return t.fill_(float("nan")) if poison_outputs else t


def num_threads() -> int:
    """As many threads as torch itself uses for intra-op work (never more). The kernels give a small call
    fewer (``cpu_parallel_min_work``, applied here: every kernel call on the full path asks for this)."""
    threads = torch.get_num_threads()
    global _applied_min_work
    work = PARALLEL_MIN_WORK if PARALLEL_MIN_WORK is not None else _dispatch.decide("cpu_parallel_min_work")
    if work != _applied_min_work:
        from .. import _C

        _C.set_parallel_min_work(int(work))
        _applied_min_work = work
    return max(1, threads)


_applied_min_work = 0  # the value _C holds (its own default: 0, every call takes every thread)


# The CPU crossovers (fused few-token kernels vs the GEMM path) are measured on the machine that runs
# them, on first use: ops/_dispatch.py. Tests and benchmarks may pin one for every variant here
# (None: the measured value).
PARALLEL_MIN_WORK: Optional[int] = None  # fewest multiply-adds per thread in the few-token kernels (0: no limit)
CPU_FUSED_MAX_M: Optional[dict] = None  # {dtype: largest M for the fused LoRA/VeRA row kernel}
CPU_ROWS_MAX_M: Optional[dict] = None  # {dtype: largest M for the row kernel over a frozen weight alone (ops/lora.py frozen_linear)}
CPU_INPUT_GRAD_MAX_M: Optional[dict] = None  # {dtype: largest M for the dx = dy W + g A kernel}
NF4_CPU_FUSED_MAX_M: Optional[int] = None  # largest M for the fused NF4 dequant-GEMV rows kernel (every dtype)
NF4_CPU_BF16_DOT: Optional[bool] = None  # bf16 x in the NF4 rows kernel: AVX512-BF16 products (True) or widened
NF4_CPU_INPUT_GRAD_MAX_M: Optional[Union[int, dict]] = None  # largest M for the NF4 dx = dy W kernel ({dtype: M}, or one M for both)
NF4_CPU_INPUT_GRAD_BF16_DOT: Optional[Union[bool, int]] = None  # bf16 dy in the NF4 dx = dy W kernel: AVX512-BF16 products at every M (True), none (False), or from this M
NF4_CPU_TILED_M: Optional[tuple] = None  # (lo, hi, w): inference M in [lo, hi] takes the tiled NF4 layout, bf16 x widened to M = w
CPU_ADAPTER_PRODUCTS: Optional[dict] = None  # {dtype: True for csrc/cpu/adapter_products.cpp, False for GEMMs}
CPU_LORA_BF16_DOT: Optional[bool] = None  # bf16 x in the LoRA rows kernel: AVX512-BF16 products (True) or widened
CPU_INPUT_GRAD_BF16_DOT: Optional[bool] = None  # bf16 dy in the dx = dy W + g A kernel: AVX512-BF16 products or widened
CPU_FP32_GEMM: Optional[str] = None  # many-token fp32 products: "torch" (torch.mm) or "onednn" (ops/_gemm.py)
CPU_TILE_BUFFER_MAX_M: Optional[dict] = None  # {dtype: largest M whose tile products go to an [n, M] buffer}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_fused_max_m(dtype: torch.dtype) -> int:
    if CPU_FUSED_MAX_M is not None:
        return CPU_FUSED_MAX_M[dtype]
    return _dispatch.decide(f"cpu_fused_max_m/{_name(dtype)}")


def cpu_rows_max_m(dtype: torch.dtype) -> int:
    """The largest M at which a frozen weight's product alone, no adapter and no gradient (an output
    head, a merged layer), takes the row kernel rather than the GEMM."""
    if CPU_ROWS_MAX_M is not None:
        return CPU_ROWS_MAX_M[dtype]
    return _dispatch.decide(f"cpu_rows_max_m/{_name(dtype)}")


def cpu_input_grad_max_m(dtype: torch.dtype) -> int:
    if CPU_INPUT_GRAD_MAX_M is not None:
        return CPU_INPUT_GRAD_MAX_M[dtype]
    return _dispatch.decide(f"cpu_input_grad_max_m/{_name(dtype)}")


def cpu_adapter_products(dtype: torch.dtype, r: int) -> bool:
    """Whether rank-``r`` adapter products go to csrc/cpu/adapter_products.cpp rather than GEMMs."""
    if CPU_ADAPTER_PRODUCTS is not None:
        return CPU_ADAPTER_PRODUCTS[dtype]
    return r <= _dispatch.decide(f"cpu_adapter_products_max_r/{_name(dtype)}")


def cpu_lora_bf16_dot() -> bool:
    """Whether a bf16 x in the fused LoRA row kernel is read as bf16 for AVX512-BF16 products against
    the bf16 W (exact products, fp32 sums) rather than widened to fp32: measured where the kernel variant
    has them ("widen" without measuring elsewhere; the kernel itself widens where they are missing)."""
    if CPU_LORA_BF16_DOT is not None:
        return CPU_LORA_BF16_DOT
    return _dispatch.decide("cpu_lora_bf16_rows") == "dot"


def cpu_input_grad_bf16_dot() -> bool:
    """Whether a bf16 dy in the few-token input-gradient kernel is read as bf16 for AVX512-BF16 products
    against the bf16 W (exact products, fp32 sums) rather than widened to fp32: measured where the kernel
    variant has them ("widen" without measuring elsewhere; the kernel itself widens where they are
    missing)."""
    if CPU_INPUT_GRAD_BF16_DOT is not None:
        return CPU_INPUT_GRAD_BF16_DOT
    return _dispatch.decide("cpu_input_grad_bf16_rows") == "dot"


def cpu_tile_buffer_max_m(dtype: torch.dtype) -> int:
    if CPU_TILE_BUFFER_MAX_M is not None:
        return CPU_TILE_BUFFER_MAX_M[dtype]
    return _dispatch.decide(f"cpu_tile_buffer_max_m/{_name(dtype)}")


def nf4_cpu_fused_max_m(dtype: torch.dtype) -> int:
    if NF4_CPU_FUSED_MAX_M is not None:
        return NF4_CPU_FUSED_MAX_M
    return _dispatch.decide(f"nf4_cpu_fused_max_m/{_name(dtype if dtype == torch.bfloat16 else torch.float32)}")


def nf4_cpu_bf16_dot() -> bool:
    """Whether a bf16 x in the NF4 rows kernel takes the AVX512-BF16 products (W rounded once to bf16)
    rather than being widened to fp32 against the exact fp32 W: measured where the kernel variant has
    them ("widen" without measuring elsewhere; the kernel itself widens where they are missing)."""
    if NF4_CPU_BF16_DOT is not None:
        return NF4_CPU_BF16_DOT
    return _dispatch.decide("nf4_cpu_bf16_rows") == "dot"


def nf4_cpu_input_grad_bf16_dot(m: int) -> bool:
    """Whether ``m`` bf16 dy rows in the NF4 input gradient's few-token kernel take AVX512-BF16 products over
    W rounded once to bf16 (the GEMM path's bf16 tiles' contract) rather than being widened against the
    exact fp32 W: from the measured M on, where the kernel variant has them (never elsewhere; the kernel
    itself widens where they are missing)."""
    pinned = NF4_CPU_INPUT_GRAD_BF16_DOT
    if isinstance(pinned, bool):
        return pinned
    from_m = pinned if pinned is not None else _dispatch.decide("nf4_cpu_input_grad_bf16_dot_from_m")
    return 0 < from_m <= m


def nf4_cpu_tiled(dtype: torch.dtype, m: int) -> tuple[bool, bool]:
    """``(tiled, widen)`` for an inference call of ``m`` tokens of ``dtype``: whether it takes the tiled
    NF4 layout (ops/nf4.py's ``TiledWeight``, csrc/cpu/nf4_tiled.cpp) rather than the row-major
    kernels, and whether a bf16 x is widened to fp32 there (exact W, fp32 products: at few tokens the
    decode then costs less than the bf16 rounding of W it skips) rather than read as bf16."""
    if NF4_CPU_TILED_M is not None:
        lo, hi, widen_to = NF4_CPU_TILED_M
    else:
        lo, hi, widen_to = _dispatch.decide(_NF4_TILED_DECISION[dtype == torch.bfloat16])
    return 0 < lo <= m <= hi, dtype == torch.bfloat16 and m <= widen_to  # (lo = 0: never)


_NF4_TILED_DECISION = ("nf4_cpu_tiled_m/float32", "nf4_cpu_tiled_m/bfloat16")


def nf4_cpu_input_grad_max_m(dtype: torch.dtype) -> int:
    """The largest M at which the NF4 input gradient of a ``dtype`` grad_y takes the few-token kernel
    rather than the GEMM path, which for bf16 runs torch's bf16 GEMM over bf16 tiles where that is the
    fast one: each dtype has its own crossover."""
    pinned = NF4_CPU_INPUT_GRAD_MAX_M
    if pinned is not None:
        return pinned if isinstance(pinned, int) else pinned[dtype]
    return _dispatch.decide(f"nf4_cpu_input_grad_max_m/{'bfloat16' if dtype == torch.bfloat16 else 'float32'}")


# CUDA: one warp per output row re-reads W once per 8 x rows; above ~16 rows cuBLAS should win
# (not yet measured on a GPU).
CUDA_FUSED_MAX_M = 16
