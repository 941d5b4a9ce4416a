"""The many-token path: products handed to the best GEMM torch has, with one reused workspace.

fp32 products go to torch.mm's GEMM or to oneDNN's (torch's mkldnn linear op), whichever this machine
measured the faster (``cpu_fp32_gemm``): :func:`linear` and :func:`mm`.

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
from torch.autograd.function import once_differentiable

from .._autocast import off_in_backward
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


# oneDNN's matmul through torch's own op (the one torch.compile's CPU backend calls), where this torch
# was built with it. On a 2-core Zen 4 VM its fp32 GEMM ran 2.2x faster than torch.mm's (MKL: 110 against
# 230-255 G multiply-adds/s at 512 x 576 x 1536, 2048^3, and with either operand a transposed view),
# fp32 throughout: it is a measured choice like the others (cpu_fp32_gemm).
try:
    _LINEAR = torch.ops.mkldnn._linear_pointwise.default
    _LINEAR_ADD = torch.ops.mkldnn._linear_pointwise.binary
except (AttributeError, RuntimeError):  # pragma: no cover - a torch built without oneDNN
    _LINEAR = _LINEAR_ADD = None


def onednn_available() -> bool:
    return _LINEAR is not None and torch.backends.mkldnn.is_available()


def cpu_fp32_onednn() -> bool:
    """True where oneDNN's fp32 GEMM beat torch.mm's on this machine (measured once: ops/_dispatch.py,
    ``cpu_fp32_gemm``); the many-token fp32 products then go to it (:func:`linear`)."""
    if _runtime.CPU_FP32_GEMM is not None:
        return _runtime.CPU_FP32_GEMM == "onednn"
    return _dispatch.decide("cpu_fp32_gemm") == "onednn"


def onednn_for(*tensors: torch.Tensor) -> bool:
    """Whether a product of ``tensors`` goes to oneDNN: all fp32 CPU tensors, none empty, and oneDNN's
    GEMM the one this machine measured the faster."""
    return all(t.is_cpu and t.dtype == torch.float32 and t.numel() > 0 for t in tensors) and cpu_fp32_onednn()


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
           add: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``x wᵀ (+ bias) (+ add)`` for ``x`` [M, K] and ``w`` [N, K] (any strides: ``w`` may be a transposed
    view), a fresh [M, N]: fp32 on the CPU by the GEMM this machine measured the faster, torch.mm's or
    oneDNN's (``cpu_fp32_gemm``); anything else by torch's. ``add`` [M, N] enters the GEMM's accumulator
    (addmm's C, oneDNN's sum post-op), so the whole sum is rounded once."""
    if add is not None and bias is not None:
        add = add + bias  # (callers with both fold the bias into their term themselves)
    if onednn_for(x, w):
        # oneDNN's fast kernels take a matrix stored densely, row- or column-major: a slice with a longer
        # leading dimension (VeRA's shared projections, A[:, :k] of A [r, max_in]) sent it to a reference
        # loop 2500x slower (256 x 576 of a 1536-wide A at 512 tokens: 756 ms against 0.3). Such an operand
        # is copied first: its size against the product's multiply-adds.
        x, w = _dense(x), _dense(w)
        if add is None:
            return _LINEAR(x, w, bias, "none", [], "")
        return _LINEAR_ADD(x, add.contiguous(), w, None, "add")
    if add is not None:
        return torch.addmm(add, x, w.t())
    return torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is stored densely in row- or column-major order, else a contiguous copy."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def mm(a: torch.Tensor, b: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a b (+ add)``: :func:`linear` with ``b``'s transposed view."""
    return linear(a, b.t(), add=add)


def upcast_tiles_needed(weight: torch.Tensor) -> bool:
    """True when ``weight`` should be widened tile by tile to fp32 instead of used as is."""
    return weight.device.type == "cpu" and weight.dtype != torch.float32 and (
        weight.dtype != torch.bfloat16 or not cpu_bf16_gemm_native()
    )


def _tile_rows(k: int) -> int:
    return max(16, _TILE_FLOATS // max(k, 1))


def linear_tiles_fp32(x32: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None],
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``x32 @ Wᵀ (+ bias)`` in fp32 ([M, n], contiguous) for a weight [n, k] that ``fill(n0, tile)`` writes
    into fp32 row tiles (:func:`linear_tiles`)."""
    return linear_tiles(x32, n, k, fill, bias=None if bias is None else bias.float())


def linear_tiles(x: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None],
                 bias: Optional[torch.Tensor] = None, into: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """``x @ Wᵀ (+ bias)`` ([M, n] of x's dtype) for a weight [n, k] that ``fill(n0, tile)`` writes into
    row tiles of x's dtype (fp32, or bf16 where torch's bf16 GEMM is the faster one: fp32 accumulation
    inside, the bias (x's dtype) added to it as addmm's C, one rounding). ``into`` (contiguous [M, n] of
    x's dtype, no ``bias`` with it): ``into + x @ Wᵀ``, ``into`` entering the GEMM's accumulator as addmm's
    C, written into ``into`` and returned.

    Each tile's product goes either into an ``[n, M]`` buffer, copied into rows at the end, or straight
    into the tile's columns of a contiguous ``[M, n]`` (a strided ``out``): the same bits, at speeds that
    depend on the GEMM library, the dtype and M (a Zen 4: fp32 into columns 3x slower at M = 16, 1.9x
    at 64, 4 % faster at 512; bf16 never slower), so measured per machine (``cpu_tile_buffer_max_m``),
    the copy included. The result is contiguous either way, as ``nn.Linear``'s: the buffer's transposed
    view had been returned as it was, and every consumer copied it (the next projection, the SiLU
    product, attention, the norm) or failed on it (a caller's ``.view(-1)``).
    """
    if into is not None and bias is not None:
        raise ValueError("bias: fold it into `into` (linear_tiles takes one or the other)")
    rows = _tile_rows(k)
    ws = _workspace(min(rows, n) * k, x.device, x.dtype)
    if onednn_for(x, ws):  # oneDNN writes fresh outputs: one per tile
        if n <= rows and into is None:
            tile = ws.view(n, k)
            fill(0, tile)
            return linear(x, tile, bias=bias)
        y = into if into is not None else torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            tile = ws[: (n1 - n0) * k].view(n1 - n0, k)
            fill(n0, tile)
            add = None if into is None else into[:, n0:n1]
            y[:, n0:n1] = linear(x, tile, bias=None if bias is None else bias[n0:n1], add=add)
        return y
    direct = x.shape[0] > _runtime.cpu_tile_buffer_max_m(x.dtype)
    if direct:
        y = into if into is not None else torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((n, x.shape[0]), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tile = ws[: (n1 - n0) * k].view(n1 - n0, k)
        fill(n0, tile)
        if direct:
            if into is not None:
                y[:, n0:n1].addmm_(x, tile.t())
            elif bias is None:
                torch.mm(x, tile.t(), out=y[:, n0:n1])
            else:
                torch.addmm(bias[n0:n1], x, tile.t(), out=y[:, n0:n1])
        elif into is not None:
            torch.addmm(into[:, n0:n1].t(), tile, x.t(), out=y[n0:n1])
        elif bias is None:
            torch.mm(tile, x.t(), out=y[n0:n1])
        else:
            torch.addmm(bias[n0:n1, None], tile, x.t(), out=y[n0:n1])
    if direct:
        return y
    if into is not None:
        return into.copy_(y.t())
    return y.t().contiguous()


def matmul_tiles_fp32(
    dy32: torch.Tensor, n: int, k: int, fill: Callable[[int, torch.Tensor], None], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dy32 @ W`` in fp32 ([M, k]) for a weight [n, k] that ``fill(n0, tile)`` writes into row tiles.
    (fp32 only: the tiles split the reduction over n, which 16-bit products would round per tile.)"""
    rows = _tile_rows(k)
    ws = _workspace(min(rows, n) * k, dy32.device)
    if out is None and onednn_for(dy32, ws):  # oneDNN writes a fresh output per tile, the sum so far added in
        dx = None
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            tile = ws[: (n1 - n0) * k].view(n1 - n0, k)
            fill(n0, tile)
            dx = mm(dy32[:, n0:n1], tile, add=dx)
        return dx
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
    """``x32 @ weight.T`` in fp32 ([M, N], contiguous; tiled where ``weight`` is not fp32: see
    :func:`linear_tiles`) for any float ``weight`` [N, K]; x32 is fp32 [M, K]."""
    if weight.dtype == torch.float32:
        return linear(x32, weight)
    return linear_tiles_fp32(x32, *weight.shape, _copy_rows(weight))


def matmul_fp32(dy32: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy32 @ weight`` in fp32 for any float ``weight`` [N, K]; dy32 is fp32 [M, N]."""
    if weight.dtype == torch.float32:
        if out is None:
            return mm(dy32, weight)
        return torch.mm(dy32, weight, out=out)
    return matmul_tiles_fp32(dy32, *weight.shape, _copy_rows(weight), out=out)


class DenseLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` for fp32 CPU tensors with every product on :func:`linear` / :func:`mm` (the fp32 GEMM
    this machine measured the faster): the forward, ``dx = dy W``, ``dW = dyᵀ x`` and ``db = Σ dy``.
    Full fine-tuning's layers run on it (adapters/layer.py's FullDelta), as ``F.linear`` would on
    torch.mm's GEMM."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return linear(x2, weight, bias=bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @off_in_backward
    @once_differentiable  # (oneDNN's op has no derivative of its own: a double backward raises, naming this)
    def backward(ctx, grad_y: torch.Tensor):
        x2, weight = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = mm(dy, weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = mm(dy.t(), x2) if ctx.needs_input_grad[1] else None
        grad_b = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class CastFrozenLinearFunction(torch.autograd.Function):
    """``F.linear`` under autocast for a frozen ``W`` (and bias) that autocast copies to ``dtype`` for the
    call: the same casts and the same product, but the backward, which needs only ``dx = dy W``, casts W
    again rather than holding the forward's 16-bit copy until then (lowrank/_autocast.py's
    ``cast_frozen``). Called with autocast off."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = None if bias is None else bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), b)

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_y: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = torch.matmul(grad_y, weight.to(ctx.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class WidenedFrozenLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` for a bf16 CPU ``x`` and a frozen bf16 ``W`` (and bias) on a machine where torch's bf16
    GEMM is the slow one (``cpu_bf16_gemm``: "widen", an AVX2 CPU): ``x`` widened to fp32, ``W`` widened
    tile by tile into the reused workspace, fp32 GEMMs (:func:`linear_t_fp32`), the sum rounded once to
    bf16; the backward ``dx = dy W`` the same way (:func:`matmul_fp32`). ``W`` and the bias take no
    gradient (a frozen output head: ops/lora.py's ``frozen_linear``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(weight)
        ctx.x_shape = x.shape
        y32 = linear_t_fp32(x2.float(), weight)
        if bias is not None:
            y32.add_(bias)
        return y32.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @off_in_backward
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (weight,) = ctx.saved_tensors
        dy32 = grad_y.reshape(-1, grad_y.shape[-1]).float()
        grad_x = matmul_fp32(dy32, weight).to(grad_y.dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, with :class:`DenseLinearFunction` where it helps: fp32 CPU tensors on a machine whose
    measured fp32 GEMM is oneDNN's, outside torch.compile and autocast (anything else: ``F.linear``
    itself)."""
    if (not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled()
            and onednn_for(x, weight, *([] if bias is None else [bias]))):  # fmt: skip
        return DenseLinearFunction.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
