"""Eager calls straight to the kernels.

A ``torch.library`` custom op costs ~25 µs of Python dispatch per call, and ``autograd.Function.apply``
another ~40 µs binding its arguments with ``inspect.signature`` — as much as a 576 → 1536 layer's whole
product. So where nothing needs the registry (eager mode, a plain tensor on the CPU or a GPU) a call
goes to the very function the registry would have picked (``ops/*.py``'s ``*_native``); under
``torch.compile``, export, fake/meta tensors, tensor subclasses and functorch transforms it goes
through ``torch.ops.lowrank.*`` and ``Function.apply`` as before. Both run the same code on the same
tensors, so results are the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DEVICES = ("cpu", "cuda")


def ok(t) -> bool:
    """True when a call on ``t`` may skip the op registry (see the module docstring)."""
    return type(t) is Tensor and t.device.type in _DEVICES and not torch.compiler.is_compiling()


def apply(function: type, *args):
    """``function.apply(*args)`` without ``Function.apply``'s per-call argument binding, in eager mode."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


def any_requires_grad(*tensors) -> bool:
    """Whether any of ``tensors`` requires a gradient (a non-tensor does not: the argument checks that
    follow name it, rather than an AttributeError here)."""
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


_ABSENT = object()


def param(module: torch.nn.Module, name: str):
    """``module.<name>`` for a parameter (or None), read from ``_parameters`` where it is registered there:
    ``Module.__getattr__`` costs ~0.4 µs, a call's largest cost after the kernel for a small layer. Any
    other attribute (a parametrization's property, a plain one) the usual way."""
    t = module._parameters.get(name, _ABSENT)
    return getattr(module, name) if t is _ABSENT else t


def submodule(module: torch.nn.Module, name: str):
    """``module.<name>`` for a submodule, read from ``_modules`` (as :func:`param`)."""
    m = module._modules.get(name, _ABSENT)
    return getattr(module, name) if m is _ABSENT else m
