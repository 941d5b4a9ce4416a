"""``torch.autograd.Function``s, one per method. Forward and backward call registered ops
(``torch.ops.lowrank.*``) only, never the extension directly."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Importing the ops module registers torch.ops.lowrank.*.
from . import ops as _ops  # noqa: F401

_lowrank = torch.ops.lowrank


class LoRALinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ``; ``x_a`` is ``adapter_input`` (dropout(x)) or ``x``.

    Saves ``x`` (only when W needs a gradient), ``x_a`` and ``u = x_a Aᵀ``; nothing the size of y.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        adapter_input: Optional[Tensor],
    ) -> Tensor:
        y, u = _lowrank.lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)
        return y, u

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scale, adapter_input = inputs
        _, u = output
        ctx.mark_non_differentiable(u)
        ctx.scale = scale
        ctx.has_dropout = adapter_input is not None
        ctx.has_bias = bias is not None
        xa = x if adapter_input is None else adapter_input
        x_for_dw = x if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_for_dw, xa, weight, lora_a, lora_b, u)

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_u: Optional[Tensor]):
        x, xa, weight, lora_a, lora_b, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_xa = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_a, grad_b, g = _lowrank.lora_linear_backward_adapter(grad_y, xa, u, lora_a, lora_b, ctx.scale)
        grad_x = grad_xa = grad_w = grad_bias = None
        if need_x:
            if ctx.has_dropout:
                grad_x = _lowrank.lora_linear_backward_input(grad_y, weight, None, None)
            else:
                grad_x = _lowrank.lora_linear_backward_input(grad_y, weight, g, lora_a)
        if need_xa and ctx.has_dropout:
            grad_xa = (g @ lora_a.float()).to(xa.dtype)
        if need_w:
            n, k = weight.shape
            grad_w = grad_y.reshape(-1, n).t().mm(x.reshape(-1, k))
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return (
            grad_x,
            grad_w,
            grad_bias,
            grad_a if need_a else None,
            grad_b if need_b else None,
            None,
            grad_xa,
        )
