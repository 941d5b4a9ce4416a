"""NF4 ops: schema, reference, fake, CPU and CUDA kernels (the format is in csrc/nf4.h and DESIGN.md).

A quantized weight travels through the ops as eight arguments, in this order (``_N_WEIGHT_ARGS``):

    codes      uint8 [ceil(out*in/2), 1]   two codes per byte, the first element in the high nibble
    absmax     float32 [nblocks], or uint8 [nblocks] when double-quantized
    absmax2    float32 [ceil(nblocks/blocksize2)]  (double quantization; else None)
    code2      float32 [256], the 8-bit dynamic map      (double quantization; else None)
    offset     float32 [] (a 0-d tensor: mean of absmax) (double quantization; else None)
    shape      [out, in]
    blocksize, blocksize2

Ops (``torch.ops.lowrank.*``):

- ``nf4_quantize(weight, blocksize) -> (codes, absmax)``: NF4 codes and fp32 block scales
- ``nf4_double_quant(absmax, offset, code2, blocksize2) -> (qabsmax, absmax2)``
- ``nf4_dequantize(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, dtype) -> W``
- ``nf4_linear_forward(x, <weight>, bias, lora_a, lora_b, scale, adapter_input) -> (y, u)``:
  ``y = x Wᵀ + bias + scale·u Bᵀ`` with ``u = x_a Aᵀ`` (fp32; empty ``[..., 0]`` without an adapter)
- ``nf4_linear_backward_input(grad_y, <weight>, g, lora_a) -> grad_x = grad_y W + g A``

Kernels: few tokens take the fused dequant-GEMV (codes and scales read once, decoded in registers with
the exact fp32 table, the LoRA term added in the same pass), and the backward's ``grad_y W`` streams the
codes the same way; many tokens dequantize W tile by tile into one reused workspace and hand each tile
to torch's GEMM (ops/_gemm.py), in forward and backward, so no dense copy of W outlives a call (fp32
tiles; bf16 tiles for a bf16 forward where torch's bf16 GEMM is the faster). Inference without
gradients may instead run over a tiled copy of the codes (``TiledWeight``: tiles of 16 rows, one
512-bit lane per output row; AVX-512 only) for the token counts where that was measured faster. The
crossovers are measured on the machine (ops/_dispatch.py) and read through ops/_runtime.py.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C
from .._autocast import off_in_backward
from .._validate import check_tensor, cuda_stream, last_dim_contiguous, matrix, optional_matrix
from . import _direct, _gemm, _runtime
from . import lora as _lora
from .lora import check_adapter_grad

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_NATIVE = (torch.float32, torch.bfloat16)
_CUDA_NATIVE = (torch.float32, torch.bfloat16, torch.float16)
HAS_CUDA_KERNELS = hasattr(_C, "nf4_rows_cuda")


@functools.lru_cache(maxsize=None)
def _nf4_table_cached(device: torch.device) -> Tensor:
    return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)


def nf4_table(device="cpu") -> Tensor:
    """The 16 NF4 values (index = code), fp32."""
    return _nf4_table_cached(torch.device(device))


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> Tensor:
    # The signed 8-bit "dynamic" map (Dettmers, 8-bit approximations for parallelism): for each of 7
    # decades 10^(i-6), the 2^i midpoints between 2^i + 1 evenly spaced points in [0.1, 1], with both
    # signs; then 0 and 1.0, sorted. 2 + 2 * (1 + 2 + ... + 64) = 256 entries; range -0.99297 .. 1.0, one zero.
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device="cpu") -> Tensor:
    """The 256-entry signed dynamic map that double quantization codes the absmax values with (a fresh
    tensor: callers may keep it as a buffer)."""
    return _dynamic_map_cpu().to(device, copy=True)


def nbytes_codes(numel: int) -> int:
    return (numel + 1) // 2


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every kernel, the fake one included)
# ---------------------------------------------------------------------------------------------
def _check_blocksize(name: str, blocksize) -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {BLOCKSIZES}, got {blocksize!r}")


def _check_weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, device=None) -> None:
    if len(shape) != 2 or any((not isinstance(s, int)) or s < 0 for s in shape):
        raise ValueError(f"shape: expected [out_features, in_features] of non-negative ints, got {list(shape)}")
    _check_blocksize("blocksize", blocksize)
    numel = shape[0] * shape[1]
    nblocks = -(-numel // blocksize)
    check_tensor("codes", codes, dtypes=(torch.uint8,), device=device)
    device = codes.device
    if codes.numel() != nbytes_codes(numel) or not codes.is_contiguous():
        raise ValueError(
            f"codes: expected {nbytes_codes(numel)} contiguous bytes for a {shape[0]}x{shape[1]} weight, "
            f"got shape {list(codes.shape)}{'' if codes.is_contiguous() else ' (not contiguous)'}"
        )
    nested = absmax2 is not None
    if nested != (code2 is not None) or nested != (offset is not None):
        raise ValueError("absmax2, code2 and offset: give all three (double quantization) or none")
    check_tensor("absmax", absmax, dtypes=(torch.uint8,) if nested else (torch.float32,), device=device, shape=(nblocks,))
    if not absmax.is_contiguous():
        raise ValueError("absmax: must be contiguous")
    if nested:
        if not isinstance(blocksize2, int) or blocksize2 < 1:
            raise ValueError(f"blocksize2: expected a positive int, got {blocksize2!r}")
        check_tensor("absmax2", absmax2, dtypes=(torch.float32,), device=device, shape=(-(-nblocks // blocksize2),))
        check_tensor("code2", code2, dtypes=(torch.float32,), device=device, shape=(256,))
        check_tensor("offset", offset, dtypes=(torch.float32,), device=device)
        if offset.numel() != 1:
            raise ValueError(f"offset: expected one value, got shape {list(offset.shape)}")
        if not (absmax2.is_contiguous() and code2.is_contiguous()):
            raise ValueError("absmax2 and code2: must be contiguous")


def _check_forward(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b,
                   scale, adapter_input) -> None:  # fmt: skip
    check_tensor("x", x, dtypes=_FLOATS)
    _check_weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, device=x.device)
    n, k = shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected [..., {k}] to match the weight's in_features, got {list(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype, torch.float32), device=x.device, shape=(n,))
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b: give both or neither")
    if lora_a is not None:
        check_tensor("lora_a", lora_a, dtypes=(x.dtype, torch.float32), device=x.device, ndim=2)
        r = lora_a.shape[0]
        if lora_a.shape[1] != k:
            raise ValueError(f"lora_a: expected [r, {k}], got {list(lora_a.shape)}")
        check_tensor("lora_b", lora_b, dtypes=(lora_a.dtype,), device=x.device, shape=(n, r))
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if adapter_input is not None:
        if lora_a is None:
            raise ValueError("adapter_input: given without an adapter (lora_a, lora_b)")
        check_tensor("adapter_input", adapter_input, dtypes=(x.dtype,), device=x.device, shape=tuple(x.shape))


def _check_backward_input(grad_y, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, g, lora_a):
    check_tensor("grad_y", grad_y, dtypes=_FLOATS)
    _check_weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, device=grad_y.device)
    n, k = shape
    if grad_y.dim() < 1 or grad_y.shape[-1] != n:
        raise ValueError(f"grad_y: expected [..., {n}] to match the weight's out_features, got {list(grad_y.shape)}")
    check_adapter_grad(grad_y, g, lora_a, k)


def _check_dtype(name: str, dtype) -> None:
    if dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {dtype}")


def _check_quantize(weight, blocksize) -> None:
    check_tensor("weight", weight, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    _check_blocksize("blocksize", blocksize)


def _check_double_quant(absmax, offset, code2, blocksize2) -> None:
    check_tensor("absmax", absmax, dtypes=(torch.float32,), ndim=1)
    check_tensor("offset", offset, dtypes=(torch.float32,), device=absmax.device)
    if offset.numel() != 1:
        raise ValueError(f"offset: expected one value, got shape {list(offset.shape)}")
    check_tensor("code2", code2, dtypes=(torch.float32,), device=absmax.device, shape=(256,))
    if not isinstance(blocksize2, int) or blocksize2 < 1:
        raise ValueError(f"blocksize2: expected a positive int, got {blocksize2!r}")


# ---------------------------------------------------------------------------------------------
# Reference kernels: the spec, in plain torch (bitsandbytes' arithmetic, step by step).
# ---------------------------------------------------------------------------------------------
def nf4_quantize_reference(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _check_quantize(weight, blocksize)
    flat = weight.reshape(-1).float()
    if flat.numel() and not bool(torch.isfinite(flat).all()):
        raise ValueError("weight: contains NaN or infinity; NF4 cannot represent it")
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:  # a partial last block: divided, and its absmax stored clamped
        am = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, (flat[full:] / am).clamp(-1, 1)])
    table = nf4_table(weight.device)
    midpoints = (table[:-1] + table[1:]) / 2
    if n % 2:  # the last byte's second value: bitsandbytes pads with 0.0 (code 7)
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # right=False: a tie goes to the lower code
    codes = (q[0::2] << 4) | q[1::2]
    return codes.reshape(-1, 1), absmax


@functools.lru_cache(maxsize=8)
def _bin_codes(code2_values: tuple) -> Tensor:
    code2 = torch.tensor(code2_values, dtype=torch.float32)
    mid = 0.5 * (code2[:-1] + code2[1:])
    centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mid, centres, side="left").to(torch.uint8)  # midpoints strictly below


def nf4_double_quant_reference(absmax: Tensor, offset: Tensor, code2: Tensor, blocksize2: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantizer: each scaled value goes to one of 65536 bins,
    each bin to the code2 entry nearest its centre (see csrc/cpu/nf4.cpp)."""
    _check_double_quant(absmax, offset, code2, blocksize2)
    a = absmax - offset.reshape(())
    n = a.numel()
    pad = (-n) % blocksize2
    blocks = torch.cat([a, a.new_zeros(pad)]).reshape(-1, blocksize2)
    absmax2 = blocks.abs().amax(dim=1)
    inv = 1.0 / torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
    s = (blocks * inv[:, None]).clamp(-1, 1)
    bins = (((s + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    q = _bin_codes(tuple(code2.tolist())).to(a.device)[bins]
    q = torch.where(absmax2[:, None] > 0, q, torch.zeros_like(q))
    return q.reshape(-1)[:n].contiguous(), absmax2


def decode_absmax(absmax, absmax2, code2, offset, blocksize2) -> Tensor:
    """fp32 block scales: ``code2[q] * absmax2[i // blocksize2] + offset`` (or ``absmax`` as is)."""
    if absmax2 is None:
        return absmax
    idx = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
    return code2[absmax.long()] * absmax2[idx] + offset.reshape(())


def nf4_dequantize_reference(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, dtype):
    _check_weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2)
    _check_dtype("dtype", dtype)
    numel = shape[0] * shape[1]
    b = codes.reshape(-1)
    q = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:numel].long()
    scales = decode_absmax(absmax, absmax2, code2, offset, blocksize2)
    idx = torch.arange(numel, device=codes.device) // blocksize
    w = nf4_table(codes.device)[q] * scales[idx]
    return w.reshape(shape).to(dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nf4_linear_forward_reference(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias,
                                 lora_a, lora_b, scale, adapter_input):  # fmt: skip
    _check_forward(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b,
                   scale, adapter_input)  # fmt: skip
    acc = _acc(x.dtype)
    w = nf4_dequantize_reference(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, torch.float32)
    y = x.to(acc) @ w.to(acc).t()
    if lora_a is not None:
        xa = x if adapter_input is None else adapter_input
        u = xa.to(acc) @ lora_a.to(acc).t()
        y = y + scale * (u @ lora_b.to(acc).t())
    else:
        u = x.new_zeros(tuple(x.shape[:-1]) + (0,), dtype=acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u.to(torch.float32)


def nf4_linear_backward_input_reference(grad_y, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2,
                                        g, lora_a):  # fmt: skip
    _check_backward_input(grad_y, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, g, lora_a)
    acc = _acc(grad_y.dtype)
    w = nf4_dequantize_reference(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, torch.float32)
    dx = grad_y.to(acc) @ w.to(acc)
    if g is not None:
        dx = dx + g.to(acc) @ lora_a.to(acc)
    return dx.to(grad_y.dtype)


# ---------------------------------------------------------------------------------------------
# Schemas; the decorated bodies are the default (reference) kernels.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::nf4_quantize", mutates_args=())
def nf4_quantize(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: NF4 codes ([ceil(n/2), 1] uint8) and fp32 block scales of ``weight``."""
    return nf4_quantize_reference(weight, blocksize)


@torch.library.custom_op("lowrank::nf4_double_quant", mutates_args=())
def nf4_double_quant(absmax: Tensor, offset: Tensor, code2: Tensor, blocksize2: int) -> tuple[Tensor, Tensor]:
    """``(qabsmax, absmax2)``: 8-bit codes of ``absmax - offset`` in blocks of ``blocksize2``."""
    return nf4_double_quant_reference(absmax, offset, code2, blocksize2)


@torch.library.custom_op("lowrank::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    codes: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: Sequence[int],
    blocksize: int,
    blocksize2: int,
    dtype: torch.dtype,
) -> Tensor:
    """The dense weight: ``table[code] * absmax`` in fp32, rounded once to ``dtype``."""
    return nf4_dequantize_reference(codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2, dtype)


@torch.library.custom_op("lowrank::nf4_linear_forward", mutates_args=())
def nf4_linear_forward(
    x: Tensor,
    codes: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: Sequence[int],
    blocksize: int,
    blocksize2: int,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    scale: float,
    adapter_input: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(y, u)``: ``y = x Wᵀ + bias + scale·u Bᵀ`` in x's dtype, ``u = x_a Aᵀ`` in fp32."""
    return nf4_linear_forward_reference(x, codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2,
                                        bias, lora_a, lora_b, scale, adapter_input)  # fmt: skip


@torch.library.custom_op("lowrank::nf4_linear_backward_input", mutates_args=())
def nf4_linear_backward_input(
    grad_y: Tensor,
    codes: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: Sequence[int],
    blocksize: int,
    blocksize2: int,
    g: Optional[Tensor],
    lora_a: Optional[Tensor],
) -> Tensor:
    """``grad_x = grad_y W + g A`` in grad_y's dtype."""
    return nf4_linear_backward_input_reference(grad_y, codes, absmax, absmax2, code2, offset, list(shape), blocksize,
                                               blocksize2, g, lora_a)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Fake kernels
# ---------------------------------------------------------------------------------------------
@nf4_quantize.register_fake
def _(weight, blocksize):
    _check_quantize(weight, blocksize)
    n = weight.numel()
    return weight.new_empty((nbytes_codes(n), 1), dtype=torch.uint8), weight.new_empty(
        (-(-n // blocksize),), dtype=torch.float32
    )


@nf4_double_quant.register_fake
def _(absmax, offset, code2, blocksize2):
    _check_double_quant(absmax, offset, code2, blocksize2)
    n = absmax.numel()
    return absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty((-(-n // blocksize2),))


@nf4_dequantize.register_fake
def _(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, dtype):
    _check_weight(codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2)
    _check_dtype("dtype", dtype)
    return codes.new_empty(tuple(shape), dtype=dtype)


@nf4_linear_forward.register_fake
def _(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale,
      adapter_input):  # fmt: skip
    _check_forward(x, codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2, bias, lora_a, lora_b,
                   scale, adapter_input)  # fmt: skip
    lead = tuple(x.shape[:-1])
    r = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty(lead + (shape[0],)), x.new_empty(lead + (r,), dtype=torch.float32)


@nf4_linear_backward_input.register_fake
def _(grad_y, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, g, lora_a):
    _check_backward_input(grad_y, codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2, g, lora_a)
    return grad_y.new_empty(tuple(grad_y.shape[:-1]) + (shape[1],))


# ---------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------
def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2) -> "_C.Nf4Weight":
    nested = absmax2 is not None
    device = -1 if codes.device.type == "cpu" else codes.get_device()
    return _C.Nf4Weight(
        codes.data_ptr(),
        shape[0],
        shape[1],
        blocksize,
        0 if nested else absmax.data_ptr(),
        absmax.data_ptr() if nested else 0,
        _addr(code2),
        _addr(absmax2),
        _addr(offset),
        blocksize2,
        device,
    )


def _has_kernels(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and HAS_CUDA_KERNELS)


def _native(device: torch.device, dtype: torch.dtype) -> bool:
    return _has_kernels(device) and dtype in (_CPU_NATIVE if device.type == "cpu" else _CUDA_NATIVE)


_DTYPE_CODES = {torch.float32: _C.DType.float32, torch.bfloat16: _C.DType.bfloat16, torch.float16: _C.DType.float16}


def _quantize_native(weight, blocksize):
    _check_quantize(weight, blocksize)
    n = weight.numel()
    dev = weight.device
    if n == 0 or not _has_kernels(dev):
        return nf4_quantize_reference(weight, blocksize)
    w = weight.contiguous()
    codes = torch.empty(nbytes_codes(n), 1, dtype=torch.uint8, device=dev)
    if _runtime.poison_outputs:  # a byte the kernel forgets would otherwise pass as whatever was there
        codes.fill_(0xFF)
    absmax = _runtime.empty(-(-n // blocksize), dtype=torch.float32, device=dev)
    code = _DTYPE_CODES[w.dtype]
    if dev.type == "cpu":
        _C.nf4_quantize_cpu(w.data_ptr(), code, n, blocksize, codes.data_ptr(), absmax.data_ptr(), _runtime.num_threads())
    else:
        status = torch.zeros(1, dtype=torch.int32, device=dev)
        with torch.cuda.device(dev):
            _C.nf4_quantize_cuda(w.data_ptr(), code, n, blocksize, codes.data_ptr(), absmax.data_ptr(),
                                 status.data_ptr(), dev.index, cuda_stream(w))  # fmt: skip
        if int(status.item()):
            raise ValueError("weight: contains NaN or infinity; NF4 cannot represent it")
    return codes, absmax


def _double_quant_native(absmax, offset, code2, blocksize2):
    _check_double_quant(absmax, offset, code2, blocksize2)
    n = absmax.numel()
    dev = absmax.device
    if n == 0 or not _has_kernels(dev):
        return nf4_double_quant_reference(absmax, offset, code2, blocksize2)
    a, off, c2 = absmax.contiguous(), offset.contiguous(), code2.contiguous()
    q = torch.empty(n, dtype=torch.uint8, device=dev)
    absmax2 = _runtime.empty(-(-n // blocksize2), dtype=torch.float32, device=dev)
    args = (a.data_ptr(), n, off.data_ptr(), c2.data_ptr(), blocksize2, q.data_ptr(), absmax2.data_ptr())
    if dev.type == "cpu":
        _C.nf4_double_quant_cpu(*args, _runtime.num_threads())
    else:
        with torch.cuda.device(dev):
            _C.nf4_double_quant_cuda(*args, dev.index, cuda_stream(a))
    return q, absmax2


def _dequantize_into(out: Tensor, w: "_C.Nf4Weight", row0: int) -> None:
    if out.device.type == "cuda":
        with torch.cuda.device(out.device):
            _C.nf4_dequantize_cuda(w, row0, matrix("out", out), cuda_stream(out))
    else:
        _C.nf4_dequantize_cpu(w, row0, matrix("out", out), _runtime.num_threads())


def _dequantize_native(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, dtype):
    shape = list(shape)
    _check_weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2)
    _check_dtype("dtype", dtype)
    # fp16 on the CPU: decoded in fp32, then rounded once to fp16 (the same single rounding)
    decode_dtype = torch.float32 if codes.device.type == "cpu" and dtype == torch.float16 else dtype
    if shape[0] * shape[1] == 0 or not _native(codes.device, decode_dtype):
        return nf4_dequantize_reference(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, dtype)
    out = _runtime.empty(*shape, dtype=decode_dtype, device=codes.device)
    _dequantize_into(out, _weight(codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2), 0)
    return out if decode_dtype == dtype else out.to(dtype)


def _tile_filler(w: "_C.Nf4Weight"):
    return lambda n0, tile: _dequantize_into(tile, w, n0)


def _use_fused(device: torch.device, m: int, dtype: torch.dtype) -> bool:
    if device.type == "cpu":
        return m <= _runtime.nf4_cpu_fused_max_m(dtype)
    return m <= _runtime.CUDA_FUSED_MAX_M


def _rows_input(x2: Tensor) -> tuple[Tensor, bool]:
    """``(x_in, dot)``: x as the CPU rows kernel reads it, and whether it takes the AVX512-BF16 products.
    A bf16 x stays bf16 where those products were measured faster (``nf4_cpu_bf16_rows``); otherwise it
    is widened here, once, for the kernel and the adapter's ``u`` alike (exact W, fp32 products)."""
    if x2.dtype == torch.float32:
        return x2, False
    if x2.dtype == torch.bfloat16 and _runtime.nf4_cpu_bf16_dot():
        return x2, True
    return x2.float(), False


def _rows_cpu(y, x_in, w, bias_view, u, b_view, scale, dot: bool) -> None:
    _C.nf4_rows_cpu(matrix("out", y), matrix("x", x_in), w, bias_view, optional_matrix("u", u), b_view, float(scale),
                    _runtime.num_threads(), dot)  # fmt: skip


def _forward_native(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b,
                    scale, adapter_input):  # fmt: skip
    shape = list(shape)
    wargs = (codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2)
    _check_forward(x, *wargs, bias, lora_a, lora_b, scale, adapter_input)
    n, k = shape
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if not _native(x.device, x.dtype) or m == 0 or n == 0 or k == 0:
        return nf4_linear_forward_reference(x, *wargs, bias, lora_a, lora_b, scale, adapter_input)
    cpu = x.device.type == "cpu"
    w = _weight(*wargs)
    x2 = last_dim_contiguous(x.reshape(m, k))
    xa2 = x2 if adapter_input is None else last_dim_contiguous(adapter_input.reshape(m, k))
    bias = None if bias is None else bias.contiguous()
    r = 0 if lora_a is None else lora_a.shape[0]
    if lora_a is not None:
        lora_a, lora_b = last_dim_contiguous(lora_a), last_dim_contiguous(lora_b)
    if _use_fused(x.device, m, x.dtype):
        x_in, dot = _rows_input(x2) if cpu else (x2, False)
        u = None
        if lora_a is not None:
            xa_in = x_in if adapter_input is None else xa2
            u = _lora.down_projection(xa_in.float() if cpu else xa_in, lora_a, x.dtype)  # (CPU: u from fp32)
        y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
        if cpu:
            _rows_cpu(y, x_in, w, optional_matrix("bias", bias), u, optional_matrix("lora_b", lora_b), scale, dot)
        else:
            with torch.cuda.device(x.device):
                _C.nf4_rows_cuda(matrix("out", y), matrix("x", x_in), w, optional_matrix("bias", bias),
                                 optional_matrix("u", u), optional_matrix("lora_b", lora_b), float(scale),
                                 cuda_stream(x))  # fmt: skip
        if u is None:
            u = x.new_empty((m, 0), dtype=torch.float32)
        return y.reshape(lead + (n,)), u.reshape(lead + (r,))
    # Many tokens: W dequantized tile by tile (decoded in fp32, exact) into one reused workspace for the
    # GEMM: fp32 tiles, or bf16 tiles for a bf16 x where torch's bf16 GEMM is the faster (measured).
    if x.dtype == torch.bfloat16 and cpu and _gemm.cpu_bf16_gemm_native():
        return _forward_bf16_tiles(x2, xa2 if adapter_input is not None else None, w, n, k, bias, lora_a, lora_b,
                                   scale, lead)  # fmt: skip
    x32 = x2.float()
    y32 = _gemm.linear_tiles_fp32(x32, n, k, _tile_filler(w), bias=bias)  # (the bias inside the GEMM: no pass)
    if lora_a is not None:
        xa32 = x32 if adapter_input is None else xa2.float()
        u = _gemm.linear(xa32, lora_a.float())
        y32.addmm_(u, lora_b.float().t(), alpha=scale)
    else:
        u = x.new_empty((m, 0), dtype=torch.float32)
    if x.dtype == torch.float32 and y32.is_contiguous():
        y = y32  # already the output: fresh, contiguous (the tiles' product went straight into it)
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        y.copy_(y32)
    return y.reshape(lead + (n,)), u.reshape(lead + (r,))


class TiledWeight:
    """A CPU copy of an NF4 weight in the inference layout (csrc/nf4.h, "the inference layout"): codes in
    tiles of 16 rows x 8 columns and each row's block scales decoded to fp32. About 1.1x the codes'
    bytes (blocksize 64), made once per weight where the tiled kernel was measured faster for few-token
    inference (``_runtime.nf4_cpu_tiled``) and dropped when the layer trains. The tiled kernel
    broadcasts x and sums 16 rows per register, so no row ends in a horizontal sum and each x row is read
    once per 16 rows of W."""

    __slots__ = ("codes", "scales", "view")

    def __init__(self, w: "_C.Nf4Weight"):
        rows, cols, blocksize = w.rows, w.cols, w.blocksize
        if not _C.nf4_tileable(w):
            raise ValueError(f"weight: the tiled layout needs in_features % blocksize == 0, got {cols} and {blocksize}")
        self.codes = torch.empty(_C.Nf4Tiled.code_bytes(rows, cols), dtype=torch.uint8)
        self.scales = torch.empty(_C.Nf4Tiled.scale_count(rows, cols, blocksize), dtype=torch.float32)
        self.view = _C.Nf4Tiled(self.codes.data_ptr(), self.scales.data_ptr(), rows, cols, blocksize)
        _C.nf4_tile_cpu(w, self.view, _runtime.num_threads())

    @staticmethod
    def supported(shape, blocksize: int, dtype: torch.dtype) -> bool:
        """The layout takes this weight (in_features % blocksize == 0) and this CPU's kernel variant runs
        the tiled kernel for x of ``dtype``."""
        return shape[1] % blocksize == 0 and _C.nf4_tiled_available(_DTYPE_CODES[dtype])


def _refs(tensors) -> tuple:
    """Weak references to ``tensors`` (None stays None)."""
    return tuple([None if t is None else weakref.ref(t) for t in tensors])


def same_tensors(refs: tuple, tensors) -> bool:
    """Each of ``tensors`` is the very tensor its weak reference in ``refs`` was made from. Pointers and
    version counters alone could be fooled: a tensor freed and another allocated at its address, never
    written (version 0 both), with the same shape."""
    return all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))


class Nf4Frozen(_lora.FrozenOperands):
    """``FrozenOperands`` plus the weight's tiled inference copy (``TiledWeight``), made on first use
    and remade when the codes or scales change: another tensor, or new values written in place (each
    tensor's version counter is part of its key, so a copy into the same buffers counts)."""

    __slots__ = ("tiled",)

    def __init__(self):
        super().__init__()
        self.tiled = None

    def tiled_copy(self, w: "_C.Nf4Weight", key: tuple, tensors: tuple) -> TiledWeight:
        """The tiled copy of ``w`` (``key``: the codes' and scales' pointers, shapes and strides, the weight's
        shape and blocksizes; ``tensors``: the codes and scales, whose version counters are added to it, and
        which must be the very tensors it was made from). Not the bias, the adapter or x's dtype: a new
        adapter or a bf16 call after an fp32 one reuses it."""
        key = (key, tuple([None if t is None else t._version for t in tensors]))
        held = self.tiled
        if held is None or held[0] != key or not same_tensors(held[2], tensors):
            held = self.tiled = (key, TiledWeight(w), _refs(tensors))
        return held[1]

    def drop_tiled(self) -> None:
        self.tiled = None


def _inference_mode(dtype: torch.dtype, m: int, shape, blocksize: int, tiled: bool) -> Optional[tuple]:
    """The measured choices for an inference call of ``m`` tokens of ``dtype`` on the eager CPU path:
    ``("tiled", widen)`` for the tiled layout (``_runtime.nf4_cpu_tiled``; ``tiled=False``: never),
    ``("rows", dot)`` for the row-major kernel over the stored codes (a bf16 x read as bf16 with
    ``dot``, else widened: ``_rows_input``), None for the op's usual path (many tokens)."""
    if tiled:
        tiled, widen = _runtime.nf4_cpu_tiled(dtype, m)
        if tiled and TiledWeight.supported(shape, blocksize, torch.float32 if widen else dtype):
            return ("tiled", widen)
    if 0 < m <= _runtime.nf4_cpu_fused_max_m(dtype):
        return ("rows", dtype is torch.bfloat16 and _runtime.nf4_cpu_bf16_dot())
    return None


def _plan_key(codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b, tiled: bool) -> tuple:
    """What a CallPlan of this layer depends on: the tensors' signatures, and where the plan reads the
    tiled copy, the codes' and scales' version counters (new values written in place remake the copy)."""
    key = _lora.FrozenOperands.signature(codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b)
    if tiled:
        key += tuple([None if t is None else t._version for t in (codes, absmax, absmax2, code2, offset)])
    return key


def _planned_forward(plan: "_lora.CallPlan", x, codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale,
                     tiled: bool) -> Optional[Tensor]:  # fmt: skip
    m = plan.tokens(x)
    if not m or scale != plan.scale:
        return None
    if plan.key != _plan_key(codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b, plan.mode[0] == "tiled"):
        return None
    if plan.refs is not None and not same_tensors(plan.refs, (codes, absmax, absmax2, code2, offset)):
        return None  # (the tiled copy is derived data: it must be of these very tensors)
    if _inference_mode(plan.dtype, m, (plan.n, plan.k), plan.blocksize, tiled) != plan.mode:
        return None
    x_in = x.float() if plan.widen else x
    u = None
    if lora_a is not None:
        u = _lora.down_projection(x_in.float().reshape(m, plan.k), lora_a, x.dtype)
    y = plan.output(x, m)
    plan.rows.run(y.data_ptr(), x_in.data_ptr(), m, 0 if u is None else u.data_ptr(), plan.threads)
    return y


def forward_fast(frozen: "Nf4Frozen", x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias,
                 lora_a, lora_b, scale, *, tiled: bool = True) -> Tensor:  # fmt: skip
    """``y`` of ``nf4_linear_forward`` (no dropout) for inference: on the eager CPU few-token path the
    NF4 weight's kernel view (``_C.Nf4Weight``) and the bias and ``B`` views come from ``frozen``,
    checked and built once and rebuilt whenever a tensor's pointer, shape, strides, dtype or device
    (or the shape and blocksizes) change; otherwise the op as usual. Same kernels, same bits — except
    where the tiled inference layout was measured faster for this many tokens (``_runtime.nf4_cpu_tiled``):
    then its kernel, the same contract (exact W for fp32 x, W rounded once to bf16 for bf16 x — or, where
    measured faster for this few tokens, x widened against the exact W as the row kernel's "widen" —
    fp32 sums, one rounding), summed in another order. ``tiled=False``: never the tiled layout (and a
    copy ``frozen`` holds is freed). After one such call the next go through ``frozen.plan``
    (``ops/lora.py``'s ``CallPlan``) while it fits."""
    plan = frozen.plan
    if plan is not None:
        y = _planned_forward(plan, x, codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale, tiled)
        if y is not None:
            return y
    if not tiled and frozen.tiled is not None:
        frozen.drop_tiled()
    if _lora.eager_cpu(x) and type(codes) in _lora._PLAIN:
        n, k = shape
        m = x.numel() // k if k else 0
        mode = _inference_mode(x.dtype, m, shape, blocksize, tiled) if n > 0 and x.shape[-1] == k else None
        if mode is not None:
            weight_key = (_lora.FrozenOperands.signature(codes, absmax, absmax2, code2, offset), tuple(shape), blocksize,
                          blocksize2)  # fmt: skip
            key = (weight_key, _lora.FrozenOperands.signature(bias, lora_a, lora_b), x.dtype)
            wargs = (codes, absmax, absmax2, code2, offset, list(shape), blocksize, blocksize2)

            def build():
                _check_forward(x, *wargs, bias, lora_a, lora_b, scale, None)  # raises, naming the argument
                if not _lora.FrozenOperands.plain_cpu(codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b,
                                                      contiguous=True):  # fmt: skip
                    return None
                return (_weight(*wargs), optional_matrix("bias", bias, hold=False),
                        optional_matrix("lora_b", lora_b, hold=False))  # (cached: see lora._views)

            state = frozen.lookup(key, build)
            if state is None:
                return _forward_native(x, *wargs, bias, lora_a, lora_b, scale, None)[0]
            w, mb, me = state[1]
            x2 = _lora.rows(x, m, k)
            kind, flag = mode
            if kind == "tiled":
                tw = frozen.tiled_copy(w, weight_key, (codes, absmax, absmax2, code2, offset))
                x32 = x2.float() if flag or lora_a is not None else None
                u = None if lora_a is None else _lora.down_projection(x32, lora_a, x.dtype)
                x_in = x32 if flag else x2
                y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
                _C.nf4_rows_tiled_cpu(matrix("out", y), matrix("x", x_in), tw.view, mb, optional_matrix("u", u), me,
                                       float(scale), _runtime.num_threads())  # fmt: skip
                rows = _C.RowsPlan.nf4_tiled(tw.view, mb, me, float(scale), _DTYPE_CODES[x_in.dtype],
                                             _DTYPE_CODES[x.dtype])  # fmt: skip
            else:
                x_in, dot = _rows_input(x2)
                u = None if lora_a is None else _lora.down_projection(x_in.float(), lora_a, x.dtype)
                y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
                _rows_cpu(y, x_in, w, mb, u, me, scale, dot)
                rows = _C.RowsPlan.nf4_rows(w, mb, me, float(scale), _DTYPE_CODES[x_in.dtype], _DTYPE_CODES[x.dtype],
                                            dot)  # fmt: skip
            plan_key = _plan_key(codes, absmax, absmax2, code2, offset, bias, lora_a, lora_b, kind == "tiled")
            frozen.plan = _lora.CallPlan(plan_key, x.dtype, k, n, mode, x_in.dtype != x.dtype, rows, scale, blocksize)
            if kind == "tiled":
                frozen.plan.refs = frozen.tiled[2]
            return y.reshape(*x.shape[:-1], n)
    op = _forward_native if _direct.ok(x) else torch.ops.lowrank.nf4_linear_forward
    return op(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale, None)[0]


def _forward_bf16_tiles(x2, xa2, w, n, k, bias, lora_a, lora_b, scale, lead):
    """Many bf16 tokens where torch's bf16 GEMM is the fast one: the adapter term and the bias first,
    ``c = bias + s·u Bᵀ`` (``u = x_a Aᵀ`` in fp32; fp32 products and sums rounded once to bf16:
    ``adapter_term``), then W decoded tile by tile to bf16 for the GEMM, which adds ``x Wᵀ`` onto ``c`` in
    its fp32 accumulator (addmm's C), so the large sum is rounded once (only c's own, much smaller,
    rounding comes before it) — LoRA's bf16 path (ops/lora.py ``_base_after_adapter``).

    It had been one GEMM with the adapter as extra reduction columns,
    ``[x | s·u_hi | s·u_lo | s·u_hi] · [W | B_hi | B_hi | B_lo]ᵀ + bias`` (u and B split into bf16
    halves): the copy of x that the columns need and the 3r extra columns cost more than the term
    (a SmolLM2-shaped bf16 QLoRA training step on a Zen 4: 37 ms in ``torch.cat``, 23 in the columns)."""
    m, fill = x2.shape[0], _tile_filler(w)
    if lora_a is None:
        y = _gemm.linear_tiles(x2, n, k, fill, bias=None if bias is None else bias.to(torch.bfloat16))
        return y.reshape(lead + (n,)), x2.new_empty(lead + (0,), dtype=torch.float32)
    u = _lora.down_projection_many(x2 if xa2 is None else xa2, lora_a)
    c = _lora.adapter_term(_runtime.empty(m, n, dtype=torch.bfloat16, device=x2.device), u, lora_b, bias, scale)
    y = _gemm.linear_tiles(x2, n, k, fill, into=c)
    return y.reshape(lead + (n,)), u.reshape(lead + (lora_a.shape[0],))


def _backward_input_native(grad_y, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, g, lora_a):
    shape = list(shape)
    wargs = (codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2)
    _check_backward_input(grad_y, *wargs, g, lora_a)
    n, k = shape
    lead = tuple(grad_y.shape[:-1])
    m = math.prod(lead)
    if not _native(grad_y.device, grad_y.dtype) or m == 0 or n == 0 or k == 0:
        return nf4_linear_backward_input_reference(grad_y, *wargs, g, lora_a)
    w = _weight(*wargs)
    cpu = grad_y.device.type == "cpu"
    if (
        cpu
        and grad_y.dtype == torch.bfloat16
        and m > _runtime.nf4_cpu_input_grad_max_m(torch.bfloat16)
        and _gemm.cpu_bf16_gemm_native()
    ):
        return _backward_input_bf16_tiles(grad_y.reshape(m, n), w, n, k, g, lora_a).reshape(lead + (k,))
    if (
        cpu
        and m <= _runtime.nf4_cpu_input_grad_max_m(grad_y.dtype)
        and k % 64 == 0
        and (blocksize >= 64 or blocksize == 32)
        and _C.cpu_isa() != "portable"
    ):
        # Few tokens: W decoded in registers, a tile of dy rows' sums kept there (csrc/cpu/nf4.cpp). A
        # bf16 dy is read as it is: by AVX512-BF16 products from the M at which this machine measured them
        # faster, else widened by the kernel.
        dy = grad_y.reshape(m, n)
        dy = last_dim_contiguous(dy if dy.dtype == torch.bfloat16 else dy.float())
        tasks = _runtime.num_threads()
        workspace = torch.empty(tasks * m, k, dtype=torch.float32)
        dx32 = _runtime.empty(m, k, dtype=torch.float32, device=grad_y.device)
        _C.nf4_input_grad_cpu(matrix("out", dx32), matrix("grad_y", dy), w, matrix("workspace", workspace), tasks,
                              dy.dtype == torch.bfloat16 and _runtime.nf4_cpu_input_grad_bf16_dot(m))  # fmt: skip
    else:
        dx32 = _gemm.matmul_tiles_fp32(grad_y.reshape(m, n).float(), n, k, _tile_filler(w))
    if g is not None:
        dx32.addmm_(g.reshape(m, -1), lora_a.float())
    return dx32.to(grad_y.dtype).reshape(lead + (k,))


# Column tiles of the input-gradient path: 4 Mi bf16 values (8 MiB) each, reused (ops/_gemm.py workspace).
_COLUMN_TILE_VALUES = 1 << 22


def _backward_input_bf16_tiles(dy2: Tensor, w: "_C.Nf4Weight", n: int, k: int, g, lora_a) -> Tensor:
    """``dY·W + g·A`` for many bf16 tokens where torch's bf16 GEMM is the fast one (measured:
    ``cpu_bf16_gemm``). The adapter's share first, ``g·A`` (fp32 products and sums rounded once to bf16:
    ``adapter_term``), then W decoded to bf16 by column tiles that hold every row, the GEMM adding
    ``dY·W`` onto it in its fp32 accumulator, so each output is one fp32 accumulation over all of N,
    rounded once — row tiles would round every partial sum (hence the fp32 tiles elsewhere). (It had
    been one GEMM with the adapter as extra reduction rows, ``[dY | g_hi | g_lo | g_hi]``, a copy of dY
    per call, as the forward's columns.) Column tiles of 256 values and more ran at 0.9-1.0x the time
    of one whole GEMM (4096 x 4096 and 11008 x 4096 at M = 512, Zen 4), against ~2.5x for the fp32 GEMM
    there."""
    m = dy2.shape[0]
    dy2 = last_dim_contiguous(dy2)
    c = None
    if g is not None:
        c = _lora.adapter_term(_runtime.empty(m, k, dtype=torch.bfloat16, device=dy2.device), g.reshape(m, -1).float(),
                               lora_a, e_transposed=True)  # fmt: skip
    cols = min(k, max(64, _COLUMN_TILE_VALUES // n // 64 * 64))
    ws = _gemm._workspace(n * cols, dy2.device, torch.bfloat16)
    direct = m > _runtime.cpu_tile_buffer_max_m(torch.bfloat16)  # where products go: see _gemm.linear_tiles
    if direct:
        dx = c if c is not None else torch.empty((m, k), dtype=torch.bfloat16, device=dy2.device)
    else:
        dx = torch.empty((k, m), dtype=torch.bfloat16, device=dy2.device)
    for k0 in range(0, k, cols):
        kt = min(cols, k - k0)
        tile = ws[: n * kt].view(n, kt)
        _C.nf4_dequantize_cpu(w, 0, matrix("out", tile), _runtime.num_threads(), k0)
        if direct:
            if c is not None:
                dx[:, k0 : k0 + kt].addmm_(dy2, tile)
            else:
                torch.mm(dy2, tile, out=dx[:, k0 : k0 + kt])
        elif c is not None:
            torch.addmm(c[:, k0 : k0 + kt].t(), tile.t(), dy2.t(), out=dx[k0 : k0 + kt])
        else:
            torch.mm(tile.t(), dy2.t(), out=dx[k0 : k0 + kt])
    return dx if direct else dx.t().contiguous()  # (rows, as linear_tiles returns them)


for _device in ("cpu", "cuda"):
    nf4_quantize.register_kernel(_device)(_quantize_native)
    nf4_double_quant.register_kernel(_device)(_double_quant_native)
    nf4_dequantize.register_kernel(_device)(_dequantize_native)
    nf4_linear_forward.register_kernel(_device)(_forward_native)
    nf4_linear_backward_input.register_kernel(_device)(_backward_input_native)


# ---------------------------------------------------------------------------------------------
# Autograd: x, bias and the adapter get gradients; the quantized weight is frozen.
# ---------------------------------------------------------------------------------------------
_N_WEIGHT_ARGS = 8  # codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2


def forward_setup_context(ctx, inputs, output) -> None:
    x = inputs[0]
    wargs = inputs[1 : 1 + _N_WEIGHT_ARGS]
    bias, lora_a, lora_b, scale, adapter_input = inputs[1 + _N_WEIGHT_ARGS :]
    _, u = output
    ctx.set_materialize_grads(False)  # u / h take no gradient: no zeros made for it
    ctx.wmeta = tuple(wargs[5:])  # shape, blocksize, blocksize2
    ctx.scale = scale
    ctx.has_adapter = lora_a is not None
    ctx.has_dropout = adapter_input is not None
    ctx.has_bias = bias is not None
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    xa = x if adapter_input is None else adapter_input
    # The adapter needs x_a and u; nothing the size of y, and never a dense copy of W.
    ctx.save_for_backward(*wargs[:5], xa if ctx.has_adapter else None, lora_a, lora_b, u)


def forward_backward(ctx, grad_y: Tensor, _grad_u: Optional[Tensor]):
    if grad_y is None:  # only u / h had a gradient (grads are not materialized): it reaches nothing
        return (None,) * len(ctx.needs_input_grad)
    codes, absmax, absmax2, code2, offset, xa, lora_a, lora_b, u = ctx.saved_tensors
    shape, blocksize, blocksize2 = ctx.wmeta
    wargs = (codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2)
    need = ctx.needs_input_grad
    need_x = need[0]
    need_bias, need_a, need_b, _, need_xa = need[1 + _N_WEIGHT_ARGS :]
    grad_y = grad_y.contiguous()
    grad_x = grad_bias = grad_a = grad_b = grad_xa = None
    g = None
    direct = _direct.ok(grad_y)
    if ctx.has_adapter and (need_a or need_b or need_x or need_xa):
        backward_adapter = _lora._backward_adapter_checked if direct else torch.ops.lowrank.lora_linear_backward_adapter
        grad_a, grad_b, g = backward_adapter(grad_y, xa, u, lora_a, lora_b, ctx.scale)
    if need_x:
        through_adapter = g is not None and not ctx.has_dropout
        backward_input = _backward_input_native if direct else torch.ops.lowrank.nf4_linear_backward_input
        grad_x = backward_input(
            grad_y, *wargs, g if through_adapter else None, lora_a if through_adapter else None
        )
    if need_xa and ctx.has_dropout:
        grad_xa = (g @ lora_a.float()).to(xa.dtype)
    if need_bias and ctx.has_bias:
        grad_bias = grad_y.reshape(-1, shape[0]).sum(0)
    return (grad_x,) + (None,) * _N_WEIGHT_ARGS + (
        grad_bias,
        grad_a if need_a else None,
        grad_b if need_b else None,
        None,
        grad_xa,
    )


def _backward_input_setup_context(ctx, inputs, output) -> None:
    wargs = inputs[1 : 1 + _N_WEIGHT_ARGS]
    g, lora_a = inputs[1 + _N_WEIGHT_ARGS :]
    ctx.wmeta = tuple(wargs[5:])
    ctx.has_adapter = g is not None
    ctx.save_for_backward(*wargs[:5], g, lora_a)


def _backward_input_backward(ctx, gg):
    # grad_x = dy W + g A is linear in (dy, g, A): d/d dy = gg Wᵀ (the forward op), d/dg = gg Aᵀ, d/dA = gᵀ gg.
    codes, absmax, absmax2, code2, offset, g, lora_a = ctx.saved_tensors
    shape, blocksize, blocksize2 = ctx.wmeta
    need = ctx.needs_input_grad
    d_dy = d_g = d_a = None
    if need[0]:
        d_dy, _ = torch.ops.lowrank.nf4_linear_forward(
            gg, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, None, None, None, 1.0, None
        )
    if ctx.has_adapter:
        gg2 = gg.reshape(-1, shape[1]).to(_acc(gg.dtype))
        if need[1 + _N_WEIGHT_ARGS]:
            d_g = (gg2 @ lora_a.to(gg2.dtype).t()).to(g.dtype).reshape(g.shape)
        if need[2 + _N_WEIGHT_ARGS]:
            d_a = (g.reshape(-1, g.shape[-1]).to(gg2.dtype).t() @ gg2).to(lora_a.dtype)
    return (d_dy,) + (None,) * _N_WEIGHT_ARGS + (d_g, d_a)


nf4_linear_forward.register_autograd(off_in_backward(forward_backward), setup_context=forward_setup_context)
nf4_linear_backward_input.register_autograd(
    off_in_backward(_backward_input_backward), setup_context=_backward_input_setup_context
)
