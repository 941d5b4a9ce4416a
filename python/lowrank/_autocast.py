"""lowrank's layers under ``torch.autocast``: they cast as ``F.linear`` does there.

Inside ``torch.autocast(device, dtype)`` an ``nn.Linear`` casts its input, weight and bias to autocast's
dtype and returns its output in that dtype (fp64 inputs stay fp64). lowrank's kernels take no casts
from the dispatcher, and several of them mix dtypes on purpose (an fp32 adapter over a bf16 base, ``u``
in fp32), so a layer does those casts itself before its kernels run, and then runs them with autocast
off: its own fp32 products (``u``, an fp32 GEMM's adapter term) must not be recast to 16 bits behind
its back. What a layer keeps as it is: the adapter's trainable parameters where the kernels take them
as they are (fp32, or autocast's dtype already), so their gradients arrive in their own dtype, in full
precision (VeRA's frozen projections are cast, as a weight is; a frozen operand's copy is not kept for
the backward, which casts it again: :func:`cast_frozen`). The backward of each
``autograd.Function`` runs with autocast off too (:func:`off_in_backward`), as ``torch.amp.custom_bwd``
does for a forward that ran without it: a ``loss.backward()`` called inside the autocast region computes
what one called outside it computes. One exception to the casts, decoding: a few tokens without
gradients over an fp32 W read W as it is (``ops.lora.fp32_rows_under_autocast``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

_DEVICES = ("cpu", "cuda")  # the devices lowrank's kernels run on; autocast elsewhere is left to torch


def dtype_for(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs a linear layer on ``x`` in, or None where it does not apply: autocast off
    for x's device, or x not a tensor autocast casts (fp64, integers)."""
    if not torch._C._is_any_autocast_enabled():  # the usual call: one C call, ~0.2 µs
        return None
    device = x.device.type
    if device not in _DEVICES or not torch.is_autocast_enabled(device):
        return None
    if not x.is_floating_point() or x.dtype is torch.float64:
        return None
    return torch.get_autocast_dtype(device)


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` as autocast casts an argument: None, fp64 and non-floating tensors as they are."""
    if t is None or t.dtype is dtype or t.dtype is torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


# The attribute a per-call copy made by :func:`cast_frozen` names its source by.
_SOURCE = "_lowrank_cast_of"


def cast_frozen(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``cast(t, dtype)`` for a frozen operand an ``autograd.Function`` saves for its backward (a base weight,
    VeRA's projections). The copy names ``t`` as its source, so the Function saves ``t`` itself and casts
    it again in its backward (:func:`saved`, :func:`restored`) rather than holding a 16-bit copy of every
    frozen weight from the forward to the backward (as ``F.linear`` under autocast does). A cast is
    deterministic: the backward reads the bits the forward read. ``t`` modified in place between the two
    raises autograd's error, as it does for a weight used as it is."""
    c = cast(t, dtype)
    if (c is not t and type(c) is Tensor and not t.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):  # fmt: skip
        setattr(c, _SOURCE, t)  # (a tensor subclass's copy is saved as it is)
    return c


def saved(t: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[torch.dtype]]:
    """``(what a Function saves for t, the dtype to cast it back to)``: ``(t, None)``, or for a copy made by
    :func:`cast_frozen`, its source and the copy's dtype."""
    source = None if t is None else getattr(t, _SOURCE, None)
    return (t, None) if source is None else (source, t.dtype)


def restored(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """A tensor :func:`saved` gave, as the forward read it."""
    return t if dtype is None or t is None else t.to(dtype)


def cast_adapter(dtype: torch.dtype, *factors: Optional[Tensor]) -> tuple:
    """An adapter's parameters as the kernels take them beside a ``dtype`` input: as they are where they
    are fp32 or ``dtype`` already (all alike), else all cast to ``dtype``."""
    present = [t for t in factors if t is not None]
    if all(t.dtype in (torch.float32, dtype) for t in present) and len({t.dtype for t in present}) <= 1:
        return factors
    return tuple(cast(t, dtype) for t in factors)


def off(x: Tensor) -> torch.autocast:
    """A context with autocast off for ``x``'s device."""
    return torch.autocast(x.device.type, enabled=False)


def off_in_backward(backward):
    """Decorate an ``autograd.Function``'s ``backward`` to run with autocast off for its gradient's device,
    where it is on (a ``loss.backward()`` inside an autocast region)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if not torch._C._is_any_autocast_enabled():
            return backward(ctx, *grads)
        device = next((g.device.type for g in grads if isinstance(g, Tensor)), None)
        if device in _DEVICES and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return backward(ctx, *grads)
        return backward(ctx, *grads)

    return run
