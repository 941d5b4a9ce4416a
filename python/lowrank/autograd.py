"""``torch.autograd.Function``s, one per method. Forward and backward call registered ops
(``torch.ops.lowrank.*``) only, never the extension directly; the derivative formulas live next to
the ops (lowrank/ops/*.py), which carry the same formulas for direct op users."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import lora as _lora
from .ops import nf4 as _nf4


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


class NF4LinearFunction(torch.autograd.Function):
    """``(y, u)`` with ``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ`` over an NF4 weight ``W`` (frozen), the
    adapter optional (``lora_a = lora_b = None``: the plain 4-bit linear). The weight arrives as its
    packed parts (lowrank/ops/nf4.py, ``NF4_ARGS``); ``u`` is fp32 and not differentiable.

    Saves the adapter's ``x_a`` and ``u`` (and the packed weight it already holds): never a dense W.
    """

    @staticmethod
    def forward(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale,
                adapter_input):  # fmt: skip
        return torch.ops.lowrank.nf4_linear_forward(
            x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale,
            adapter_input,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _nf4.forward_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_u: Optional[Tensor]):
        return _nf4.forward_backward(ctx, grad_y, grad_u)
