"""RMSNorm on lowrank's CPU kernels (csrc/cpu/pointwise.cpp), for the decoder layers around the adapters,
and :func:`fast_norm` to make a transformers model use it.

transformers' ``LlamaRMSNorm`` (and the models that copy it: Qwen2/3, Mistral, Mixtral, Phi-3, SmolLM3,
...) is a chain of torch ops — an fp32 copy of the input, its square, a mean, an rsqrt, two products and
two casts — and autograd runs each op's backward in turn. On a CPU that chain is a visible share of a
small model's training step: for SmolLM2-135M's shape (61 norms over 4 x 128 tokens of width 576) its
bf16 forward and backward took 1.1 ms per norm on a Zen 5 VM, ~68 ms of a ~570 ms LoRA step. The kernel
computes the same function in one pass per direction:

    out = round(weight · round(x · r)),   r = 1 / sqrt(mean(x²) + eps)   (fp32; round: to x's dtype)

with the module's two roundings, so its outputs are the module's within fp32 rounding of r (the sum of
squares runs in a different order). The backward is the exact derivative in fp32, rounded once (autograd
through the module rounds ``dy · weight`` to bf16 first). It keeps ``x`` and ``r`` (one float per row),
where the module's ops keep an fp32 copy of ``x`` and more.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _C
from ._autocast import off_in_backward
from ._patch import SourcePatch
from ._validate import as_rows, check_tensor, matrix
from .ops import _direct, _runtime

_NATIVE = (torch.float32, torch.bfloat16)


def _plain(x, weight) -> bool:
    """The usual call: a CPU fp32/bf16 ``x`` (a plain tensor, not a subclass) and a ``weight`` [H] like it."""
    return (type(x) is Tensor and x.dtype in _NATIVE and x.is_cpu and x.dim() >= 1 and isinstance(weight, Tensor)
            and weight.dtype == x.dtype and weight.is_cpu and weight.shape == x.shape[-1:])  # fmt: skip


def _check(x, weight, eps) -> None:
    if _plain(x, weight) and type(eps) is float and eps >= 0:
        return  # the usual call: nothing to say
    check_tensor("x", x, dtypes=_NATIVE, device="cpu")  # raises, naming the argument
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (the normalized one, last)")
    check_tensor("weight", weight, dtypes=(x.dtype,), device="cpu", shape=(x.shape[-1],))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(out, rstd)``: :func:`rms_norm`'s output (x's shape and dtype) and each row's ``r`` (fp32, [rows])."""
    _check(x, weight, eps)
    h = x.shape[-1]
    x2 = as_rows(x, h)
    out = torch.empty(x.shape, dtype=x.dtype)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32)
    _C.rms_norm_cpu(matrix("out", out.view(-1, h)), matrix("x", x2), matrix("weight", weight), matrix("rstd", rstd),
                    float(eps), _runtime.num_threads())  # fmt: skip
    return out, rstd


def rms_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                      need_weight: bool = True) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """``(grad_x, grad_weight)`` of :func:`rms_norm_forward`'s ``out`` (``grad_weight`` None unless
    ``need_weight``), from ``x``, ``weight`` and the forward's ``rstd``."""
    h = x.shape[-1]
    if not (type(grad_out) is Tensor and grad_out.dtype == x.dtype and grad_out.is_cpu and grad_out.shape == x.shape):
        check_tensor("grad_out", grad_out, dtypes=(x.dtype,), device="cpu", shape=tuple(x.shape))
    x2, dy2 = as_rows(x, h), as_rows(grad_out, h)
    if not (type(rstd) is Tensor and rstd.dtype == torch.float32 and rstd.shape == x2.shape[:1]):
        check_tensor("rstd", rstd, dtypes=(torch.float32,), device="cpu", shape=(x2.shape[0],))
    dx = torch.empty(x.shape, dtype=x.dtype)
    dw = torch.empty(h, dtype=weight.dtype) if need_weight else None
    _C.rms_norm_backward_cpu(matrix("grad_x", dx.view(-1, h)), None if dw is None else matrix("grad_weight", dw),
                             matrix("grad_y", dy2), matrix("x", x2), matrix("weight", weight), matrix("rstd", rstd),
                             _runtime.num_threads())  # fmt: skip
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """:func:`rms_norm` as an autograd Function: saves ``x``, ``weight`` and ``rstd``; ``eps`` on the
    context (lowrank.recompute_pointwise rebuilds the output from them instead of storing it)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(grad_out.contiguous(), x, weight, rstd, need_weight=ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``weight · (x / sqrt(mean(x²) + eps))`` over the last dimension of ``x`` (fp32 or bf16, CPU;
    ``weight`` [H] of x's dtype), rounded as transformers' ``LlamaRMSNorm`` rounds it (``x · r`` to x's
    dtype, then the product with ``weight``), ``r`` in fp32; differentiable in ``x`` and ``weight``."""
    if torch.is_grad_enabled() and _direct.any_requires_grad(x, weight):
        return _direct.apply(RMSNormFunction, x, weight, eps)  # (its forward checks the arguments)
    return rms_norm_forward(x, weight, eps)[0]


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _llama_rms_norm() -> type:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm


def _fast_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    if _plain(hidden_states, module.weight) and not torch.compiler.is_compiling():
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return type(module).forward(module, hidden_states)  # anything else: the module's own ops


def _has_weight_and_eps(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")


_patch = SourcePatch(_llama_rms_norm, _fast_forward, _has_weight_and_eps)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' ``LlamaRMSNorm.forward`` — the same source code (the
    models that copy it: Qwen2, Mistral, ...), with its ``weight`` [H] and ``variance_epsilon``. Other
    norms (Gemma's ``1 + weight``, OLMo-2's fp32 product) are left alone."""
    return _patch.applies(module)


def fast_norm(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every RMSNorm of ``model`` that is transformers' ``LlamaRMSNorm`` (:func:`is_llama_rms_norm`)
    run on :func:`rms_norm` where its input is a CPU fp32/bf16 tensor of the weight's dtype (its own
    ops otherwise, and under ``torch.compile``); ``enabled=False`` gives them back their own forward.
    Returns ``model``. The modules keep their class, parameters and state-dict keys: only their
    instance's ``forward`` is set (a ``functools.partial``, so the model still pickles and deep-copies)."""
    return _patch.apply(model, enabled)


def fast_norms(model: nn.Module) -> int:
    """How many of ``model``'s norms run on :func:`rms_norm` (:func:`fast_norm`)."""
    return _patch.count(model)


__all__ = ["RMSNormFunction", "fast_norm", "fast_norms", "is_llama_rms_norm", "rms_norm"]
