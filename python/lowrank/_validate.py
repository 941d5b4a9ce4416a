"""The safety boundary between torch tensors and the C++ kernels.

Every native call goes through :func:`matrix`, which checks a tensor (dtype, device, shape, layout)
and turns it into a ``lowrank._C.Matrix`` view (pointer, rows, cols, leading dimension, dtype,
device). Errors are ``TypeError`` (wrong dtype or not a tensor) or ``ValueError`` (shape, device,
layout), always naming the argument and saying what was expected and what was given.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from . import _C

_DTYPES = {
    torch.float32: _C.DType.float32,
    torch.bfloat16: _C.DType.bfloat16,
    torch.float16: _C.DType.float16,
    torch.uint8: _C.DType.uint8,
    torch.int32: _C.DType.int32,
    torch.int64: _C.DType.int64,
}


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(dict.fromkeys(str(d).replace("torch.", "") for d in dtypes))


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    ndim: Optional[int] = None,
    shape: Optional[tuple] = None,
) -> None:
    """Raise a clear TypeError/ValueError unless ``t`` is a tensor meeting the given constraints.

    ``shape`` may hold ``None`` for dimensions that are free.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")


def matrix(name: str, t: torch.Tensor, *, dtypes: Optional[Iterable[torch.dtype]] = None,
           hold: bool = True) -> "_C.Matrix":
    """A ``_C.Matrix`` view of a 1-D (one row) or 2-D tensor whose last dimension is contiguous.

    Row strides are passed as the leading dimension, so slices such as ``A[:r, :k]`` need no copy.
    This runs several times per layer call, so it reads each tensor property once (~1 us a call).

    The view holds ``t`` (``hold``), so a view of a temporary — ``matrix("x", x.contiguous())`` — keeps
    the copy alive until the kernel has read it (without it, the copy's memory went back to the
    allocator when the call expression moved on, and the next temporary in the same argument list took
    it: silu_mul read up's values as gate's). ``hold=False`` is for views a layer caches between calls
    of tensors it does not own (``ops.lora.FrozenOperands``): those must not keep a replaced weight
    alive, and are keyed by the tensors' addresses, so a freed one is never read.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    code = _DTYPES.get(t.dtype)
    if code is None or (dtypes is not None and t.dtype not in tuple(dtypes)):
        check_tensor(name, t, dtypes=tuple(dtypes) if dtypes is not None else tuple(_DTYPES))  # raises
    shape, strides = t.shape, t.stride()
    if len(shape) == 1:
        rows, cols = 1, shape[0]
        ld = cols
        inner = strides[0] if cols > 1 else 1
    elif len(shape) == 2:
        rows, cols = shape
        ld = strides[0] if rows > 1 else cols
        inner = strides[1] if cols > 1 else 1
    else:
        raise ValueError(f"{name}: expected 1 or 2 dimensions, got {t.dim()} (shape {tuple(shape)})")
    if inner != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {strides}")
    if rows > 1 and ld < cols:
        raise ValueError(f"{name}: row stride {ld} is smaller than the row length {cols}")
    if t.is_cuda:
        device = t.get_device()
    elif t.is_cpu:
        device = -1
    else:
        raise ValueError(f"{name}: lowrank kernels run on cpu or cuda tensors, got {t.device}")
    return _C.Matrix(t.data_ptr(), rows, cols, ld, code, device, t if hold else None)


def optional_matrix(name: str, t: Optional[torch.Tensor], **kw) -> "Optional[_C.Matrix]":
    return None if t is None else matrix(name, t, **kw)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows can be handed to a kernel, else a contiguous copy."""
    if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        if t.dim() <= 2 or t.is_contiguous():
            return t
    return t.contiguous()


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as [rows, n] rows a kernel can take (a view where one will do, else a contiguous copy)."""
    return last_dim_contiguous(t.reshape(-1, n))


def cuda_stream(t: torch.Tensor) -> int:
    """The raw current stream of ``t``'s device (call under that device)."""
    return torch.cuda.current_stream(t.device).cuda_stream
