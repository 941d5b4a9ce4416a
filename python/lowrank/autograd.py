"""``torch.autograd.Function``s, one per method. Forward and backward call registered ops
(``torch.ops.lowrank.*``) only, never the extension directly; the derivative formulas live next to
the ops (lowrank/ops/*.py), which carry the same formulas for direct op users."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import lora as _lora


class LoRALinearFunction(torch.autograd.Function):
    """``(y, u)`` with ``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ``; ``x_a`` is ``adapter_input`` (dropout(x))
    or ``x``, ``u = x_a Aᵀ`` (fp32, not differentiable).

    Saves ``x`` (only when W needs a gradient), ``x_a`` and ``u``: nothing the size of y.
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
    ):
        return torch.ops.lowrank.lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _lora.forward_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_u: Optional[Tensor]):
        return _lora.forward_backward(ctx, grad_y, grad_u)
