"""``torch.autograd.Function``s, one per method. Forward and backward call registered ops
(``torch.ops.lowrank.*``), never the extension directly — in eager mode the ops' own kernel functions,
without the registry's dispatch (ops/_direct.py); the derivative formulas live next to the ops
(lowrank/ops/*.py), which carry the same formulas for direct op users."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autocast import off_in_backward
from .ops import _direct
from .ops import lora as _lora
from .ops import nf4 as _nf4
from .ops import vera as _vera


class LoRALinearFunction(torch.autograd.Function):
    """``(y, u)`` with ``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ``; ``x_a`` is ``adapter_input`` (dropout(x))
    or ``x``, ``u = x_a Aᵀ`` (fp32, not differentiable).

    Saves ``x`` (only when W needs a gradient), ``x_a`` and ``u``: nothing the size of y.

    ``frozen`` (optional, a layer's ``ops.lora.FrozenOperands``): the layer's kernel views of W, bias, A
    and B, built once, for the few-token eager CPU calls of the forward and of the backward, where
    building and checking them per call would cost more than the product.
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
        frozen: Optional[_lora.FrozenOperands] = None,
    ):
        if frozen is not None and adapter_input is None:
            fast = _lora.forward_train_fast(frozen, x, weight, bias, lora_a, lora_b, scale)
            if fast is not None:
                return fast
        op = _lora._forward_native if _direct.ok(x) else torch.ops.lowrank.lora_linear_forward
        return op(x, weight, bias, lora_a, lora_b, scale, adapter_input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _lora.forward_setup_context(ctx, inputs, output)

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_y: Tensor, grad_u: Optional[Tensor]):
        return _lora.forward_backward(ctx, grad_y, grad_u) + (None,)  # (none for frozen)


class NF4LinearFunction(torch.autograd.Function):
    """``(y, u)`` with ``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ`` over an NF4 weight ``W`` (frozen), the
    adapter optional (``lora_a = lora_b = None``: the plain 4-bit linear). The weight arrives as its
    packed parts (lowrank/ops/nf4.py, eight arguments); ``u`` is fp32 and not differentiable.

    Saves the adapter's ``x_a`` and ``u`` (and the packed weight it already holds): never a dense W.
    """

    @staticmethod
    def forward(x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale,
                adapter_input):  # fmt: skip
        op = _nf4._forward_native if _direct.ok(x) else torch.ops.lowrank.nf4_linear_forward
        return op(
            x, codes, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, bias, lora_a, lora_b, scale,
            adapter_input,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _nf4.forward_setup_context(ctx, inputs, output)

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_y: Tensor, grad_u: Optional[Tensor]):
        return _nf4.forward_backward(ctx, grad_y, grad_u)


class VeRALinearFunction(torch.autograd.Function):
    """``(y, h)`` with ``y = x Wᵀ + bias + b ⊙ ((d ⊙ h) B_sᵀ)``, ``h = x_a A_sᵀ`` (fp32, not
    differentiable); ``x_a`` is ``adapter_input`` (dropout(x)) or ``x``. ``vera_a``/``vera_b`` are the
    slices ``A[:r, :in]``/``B[:out, :r]`` of the shared frozen projections (views; never get gradients).
    ``weight=None``: the adapter term (plus bias) alone, for a base layer that adds its own ``x Wᵀ``.

    Saves ``h`` and ``x`` (only when W needs a gradient): nothing the size of y.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        vera_a: Tensor,
        vera_b: Tensor,
        lambda_d: Tensor,
        lambda_b: Tensor,
        adapter_input: Optional[Tensor],
    ):
        op = _vera._forward_native if _direct.ok(x) else torch.ops.lowrank.vera_linear_forward
        return op(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _vera.forward_setup_context(ctx, inputs, output)

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_y: Tensor, grad_h: Optional[Tensor]):
        return _vera.forward_backward(ctx, grad_y, grad_h)
