"""The many-token path: products handed to the best GEMM torch has, with one reused workspace.

Where torch's bf16 GEMM runs slower than its fp32 one (an AVX2 EPYC, 4096x11008 at M=512: 2.8 s vs
0.48 s; measured on each machine by ops/_dispatch.py, never guessed from its name), a bf16 weight is
widened to fp32 tile by tile into one workspace that every call reuses, and each tile goes to the
fp32 GEMM: fp32 accumulation, one rounding at the end, and no per-call 100 MB allocation (DESIGN.md,
"Hot paths allocate nothing large per call"). Where it is faster (AVX512-BF16, AMX), bf16 runs as is.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

from . import _dispatch, _runtime

# Workspace size: 1 Mi floats (4 MiB) per tile; it stays in the 16 MiB L3 while the GEMM packs it.
_TILE_FLOATS = 1 << 20
# One buffer per (thread, device): two threads never share one, and a thread's buffers go with it.
_per_thread = threading.local()


def _workspace(numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, reused across this thread's calls on ``device``."""
    buffers = _per_thread.__dict__.setdefault("buffers", {})
    key = (device.type, device.index, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def cpu_bf16_gemm_native() -> bool:
    """True where torch's own bf16 GEMM beats widening to fp32 on this machine (measured once:
    ops/_dispatch.py; AVX512-BF16 and AMX CPUs, against an AVX2 one where it is ~6x slower)."""
    return _dispatch.decide("cpu_bf16_gemm") == "native"


def upcast_tiles_needed(weight: torch.Tensor) -> bool:
    """True when ``weight`` should be widened tile by tile to fp32 instead of used as is."""
    return weight.device.type == "cpu" and weight.dtype != torch.float32 and (
        weight.dtype != torch.bfloat16 or not cpu_bf16_gemm_native()
    )


def _tile_rows(k: int) -> int:
    return max(16, _TILE_FLOATS // max(k, 1))


def linear_tiles_fp32(x32: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """``x32 @ Wᵀ`` in fp32 ([M, n], contiguous or a transposed view as :func:`linear_tiles` measured) for a
    weight [n, k] that ``fill(n0, tile)`` writes into fp32 row tiles."""
    return linear_tiles(x32, n, k, fill)


def linear_tiles(x: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """``x @ Wᵀ`` ([M, n] of x's dtype) for a weight [n, k] that ``fill(n0, tile)`` writes into row tiles
    of x's dtype (fp32, or bf16 where torch's bf16 GEMM is the faster one: fp32 accumulation inside,
    one rounding).

    Each tile's product goes either into an ``[n, M]`` buffer, returned as its transposed view, or straight
    into the tile's columns of a contiguous ``[M, n]`` (a strided ``out``): the same bits, at speeds that
    depend on the GEMM library, the dtype and M (a Zen 4: fp32 into columns 3x slower at M = 16, 1.9x
    at 64, 4 % faster at 512; bf16 never slower), so measured per machine (``cpu_tile_buffer_max_m``).
    """
    rows = _tile_rows(k)
    ws = _workspace(min(rows, n) * k, x.device, x.dtype)
    direct = x.shape[0] > _runtime.cpu_tile_buffer_max_m(x.dtype)
    y = torch.empty((x.shape[0], n) if direct else (n, x.shape[0]), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tile = ws[: (n1 - n0) * k].view(n1 - n0, k)
        fill(n0, tile)
        if direct:
            torch.mm(x, tile.t(), out=y[:, n0:n1])
        else:
            torch.mm(tile, x.t(), out=y[n0:n1])
    return y if direct else y.t()


def matmul_tiles_fp32(
    dy32: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dy32 @ W`` in fp32 ([M, k]) for a weight [n, k] that ``fill(n0, tile)`` writes into row tiles.
    (fp32 only: the tiles split the reduction over n, which 16-bit products would round per tile.)"""
    rows = _tile_rows(k)
    ws = _workspace(min(rows, n) * k, dy32.device)
    dx = out if out is not None else torch.empty(dy32.shape[0], k, dtype=torch.float32, device=dy32.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tile = ws[: (n1 - n0) * k].view(n1 - n0, k)
        fill(n0, tile)
        if n0 == 0:
            torch.mm(dy32[:, n0:n1], tile, out=dx)
        else:
            dx.addmm_(dy32[:, n0:n1], tile)
    return dx


def _copy_rows(weight: torch.Tensor) -> Callable[[int, torch.Tensor], None]:
    return lambda n0, tile: tile.copy_(weight[n0 : n0 + tile.shape[0]])


def linear_t_fp32(x32: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x32 @ weight.T`` in fp32 ([M, N]; when tiled, possibly a transposed view: see
    :func:`linear_tiles`) for any float ``weight`` [N, K]; x32 is fp32 [M, K]."""
    if weight.dtype == torch.float32:
        return torch.mm(x32, weight.t())
    return linear_tiles_fp32(x32, *weight.shape, _copy_rows(weight))


def matmul_fp32(dy32: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy32 @ weight`` in fp32 for any float ``weight`` [N, K]; dy32 is fp32 [M, N]."""
    if weight.dtype == torch.float32:
        return torch.mm(dy32, weight, out=out) if out is not None else torch.mm(dy32, weight)
    return matmul_tiles_fp32(dy32, *weight.shape, _copy_rows(weight), out=out)
