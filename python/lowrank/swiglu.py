"""A gated MLP's SiLU product on lowrank's CPU kernels (csrc/cpu/pointwise.cpp), and :func:`fast_swiglu` to
make a transformers model use it.

transformers' ``LlamaMLP`` (and the models that copy its forward with a SiLU: Qwen2/3, Mistral, Granite,
SmolLM3, OLMo-2, ...) computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: the SiLU and the product
are two torch ops, each with its own pass over [tokens, intermediate] values and its own backward (the
product's saves both factors; the SiLU's saves its input). :func:`silu_mul` is both in one pass per
direction:

    out = round(round(silu(gate)) · up)      (fp32 inside; round: to gate's dtype, as the module rounds)

and its backward is the exact derivative in fp32, each gradient rounded once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _C
from ._autocast import off_in_backward
from ._patch import SourcePatch
from ._validate import as_rows, check_tensor, matrix
from .ops import _direct, _runtime

_NATIVE = (torch.float32, torch.bfloat16)


def _plain(gate, up) -> bool:
    """The usual call: CPU fp32/bf16 ``gate`` and ``up`` of one shape and dtype (plain tensors)."""
    return (type(gate) is Tensor and gate.dtype in _NATIVE and gate.is_cpu and gate.dim() >= 1 and type(up) is Tensor
            and up.dtype == gate.dtype and up.is_cpu and up.shape == gate.shape)  # fmt: skip


def _check(gate, up) -> None:
    if _plain(gate, up):
        return  # the usual call
    check_tensor("gate", gate, dtypes=_NATIVE, device="cpu")  # raises, naming the argument
    if gate.dim() < 1:
        raise ValueError("gate: expected at least one dimension")
    check_tensor("up", up, dtypes=(gate.dtype,), device="cpu", shape=tuple(gate.shape))


def silu_mul_forward(gate: Tensor, up: Tensor) -> Tensor:
    """:func:`silu_mul`'s output, without autograd."""
    _check(gate, up)
    n = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype)
    _C.silu_mul_cpu(matrix("out", out.view(-1, n)), matrix("gate", as_rows(gate, n)), matrix("up", as_rows(up, n)),
                    _runtime.num_threads())  # fmt: skip
    return out


def silu_mul_backward(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_gate, grad_up)`` of :func:`silu_mul_forward`'s output."""
    _check(gate, up)
    plain = type(grad_out) is Tensor and grad_out.dtype == gate.dtype and grad_out.is_cpu
    if not (plain and grad_out.shape == gate.shape):
        check_tensor("grad_out", grad_out, dtypes=(gate.dtype,), device="cpu", shape=tuple(gate.shape))
    n = gate.shape[-1]
    dg = torch.empty(gate.shape, dtype=gate.dtype)
    du = torch.empty(gate.shape, dtype=gate.dtype)
    _C.silu_mul_backward_cpu(matrix("grad_gate", dg.view(-1, n)), matrix("grad_up", du.view(-1, n)),
                             matrix("grad_out", as_rows(grad_out, n)), matrix("gate", as_rows(gate, n)),
                             matrix("up", as_rows(up, n)), _runtime.num_threads())  # fmt: skip
    return dg, du


class SiLUMulFunction(torch.autograd.Function):
    """:func:`silu_mul` as an autograd Function: saves ``gate`` and ``up`` (lowrank.recompute_pointwise
    rebuilds the output from them instead of storing it)."""

    @staticmethod
    def forward(ctx, gate, up):
        out = silu_mul_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        dg, du = silu_mul_backward(grad_out.contiguous(), gate, up)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (fp32 or bf16 CPU tensors of one shape), rounded as transformers' gated MLPs
    round it (the SiLU to gate's dtype, then the product); differentiable in both."""
    if torch.is_grad_enabled() and _direct.any_requires_grad(gate, up):
        return _direct.apply(SiLUMulFunction, gate, up)  # (its forward checks the arguments)
    return silu_mul_forward(gate, up)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _llama_mlp() -> type:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - a transformers without it
        return False
    return type(act) is SiLUActivation


def _silu_and_projections(module: nn.Module) -> bool:
    parts = ("gate_proj", "up_proj", "down_proj")
    return _is_silu(getattr(module, "act_fn", None)) and all(isinstance(getattr(module, p, None), nn.Module) for p in parts)


def _fast_forward(module: nn.Module, x: Tensor) -> Tensor:
    gate = module.gate_proj(x)  # the module's order: gate, its activation, then up
    up = module.up_proj(x)
    if _plain(gate, up) and not torch.compiler.is_compiling():
        return module.down_proj(silu_mul(gate, up))
    return module.down_proj(module.act_fn(gate) * up)  # anything else: the module's own ops


_patch = SourcePatch(_llama_mlp, _fast_forward, _silu_and_projections)


def is_llama_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a gated MLP whose forward is transformers' ``LlamaMLP.forward`` — the same
    source — with a SiLU ``act_fn`` (Gemma's MLP has the same forward with a GELU: left alone) and its
    ``gate_proj``, ``up_proj`` and ``down_proj``."""
    return _patch.applies(module)


def fast_swiglu(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every gated MLP of ``model`` that is transformers' ``LlamaMLP`` with a SiLU
    (:func:`is_llama_mlp`) compute ``act_fn(gate) * up`` with :func:`silu_mul` where both are CPU
    fp32/bf16 tensors (its own ops otherwise, and under ``torch.compile``); the projections run as they
    are (adapted or not). ``enabled=False`` gives the MLPs back their own forward. Returns ``model``. As
    :func:`lowrank.fast_norm`, only the instance's ``forward`` is set (a ``functools.partial``)."""
    return _patch.apply(model, enabled)


def fast_swiglus(model: nn.Module) -> int:
    """How many of ``model``'s MLPs run on :func:`silu_mul` (:func:`fast_swiglu`)."""
    return _patch.count(model)


__all__ = ["SiLUMulFunction", "fast_swiglu", "fast_swiglus", "is_llama_mlp", "silu_mul"]
