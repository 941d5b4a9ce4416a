"""The language-modelling loss on lowrank's cross-entropy kernels (lowrank/ops/loss.py).

    loss = lowrank.cross_entropy(logits, labels)            # like F.cross_entropy over the last dim, in fp32
    lowrank.fast_loss(model)                                # a transformers causal LM's loss on these kernels

A training step of a small model spends a large share of its time in the loss: SmolLM2-135M's
vocabulary has 49152 entries, so 512 tokens make a 25 M-element logits matrix, and transformers' loss
upcasts it to fp32, keeps an fp32 log-softmax of it for the backward and builds the gradient through a
zero-filled one-hot matrix. The kernels compute the same fp32 loss keeping one float per row, and the
backward reads the logits once and writes their gradient once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .ops import _direct
from .ops import loss as _loss

_REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyFunction(torch.autograd.Function):
    """``(loss, lse)`` per row of ``logits [N, V]`` (fp32; fp64 for fp64 logits): ``loss[i] = lse[i] −
    logits[i, labels[i]]``, 0 where ``labels[i] == ignore_index``. Saves the logits themselves (no copy),
    the labels and ``lse``; ``lse`` takes no gradient."""

    @staticmethod
    def forward(logits: Tensor, labels: Tensor, ignore_index: int):
        op = _loss._forward_native if _direct.ok(logits) else torch.ops.lowrank.cross_entropy_forward
        return op(logits, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _loss.forward_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor]):
        return _loss.forward_backward(ctx, grad_loss, grad_lse)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=..., reduction=...)`` for class scores in
    the last dimension (``logits [..., V]``, ``labels [...]`` int64), on lowrank's kernels.

    Computed and returned in fp32 (fp64 for fp64 logits) whatever the logits' dtype, as transformers'
    loss does; the gradient reaching the logits is in their dtype. ``"mean"`` divides by the number of
    labels that are not ``ignore_index`` (NaN when there are none, as torch's).
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if logits.dim() < 1:
        raise ValueError("logits: expected at least 1 dimension (classes last), got a scalar")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {list(logits.shape[:-1])} (logits' shape without its last dimension), "
            f"got {list(labels.shape)}"
        )
    v, n = logits.shape[-1], labels.numel()
    rows, _ = _direct.apply(CrossEntropyFunction, logits.reshape(n, v), labels.reshape(n), ignore_index)
    if reduction == "none":
        return rows.reshape(labels.shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum()


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: Optional[int] = None,
    num_items_in_batch: Optional[Tensor] = None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on lowrank's kernels, with its signature and its results:
    position t predicts label t+1 (or ``shift_labels[t]``), the mean over labels that are not
    ``ignore_index``, or the sum divided by ``num_items_in_batch`` when given (gradient accumulation)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"logits: expected {vocab_size} classes (vocab_size) in the last dimension, got {logits.shape[-1]}")
    if shift_labels is None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    n = shift_labels.numel()
    if logits.dim() < 1 or logits.numel() != n * logits.shape[-1]:
        raise ValueError(
            f"labels: {list(shift_labels.shape)} labels for logits of shape {list(logits.shape)} "
            f"(expected one label per position of logits[..., 0])"
        )
    logits, shift_labels = logits.reshape(n, logits.shape[-1]), shift_labels.reshape(n)
    if num_items_in_batch is None:
        return cross_entropy(logits, shift_labels, ignore_index, "mean")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return cross_entropy(logits, shift_labels, ignore_index, "sum") / num_items_in_batch


def fast_loss(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make a transformers causal language model (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) compute
    its loss (``model(input_ids, labels=labels).loss``) with :func:`causal_lm_loss`; ``enabled=False``
    gives it back transformers' own. Returns ``model``.

    The loss is the same function of the logits (fp32, the same shift, reduction and
    ``num_items_in_batch``), and the outputs keep their logits: only the kernels and what they store
    differ. A model whose loss is not the causal-LM cross-entropy is refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(getattr(type(model), "loss_function", None), property):
        raise ValueError(f"model: {type(model).__name__} has no transformers loss_function to replace")
    custom = model.__dict__.get("_loss_function")
    if not enabled:
        if custom is causal_lm_loss:
            del model._loss_function
        return model
    if custom is not None and custom is not causal_lm_loss:
        raise ValueError(f"model: its loss_function was set to {getattr(custom, '__name__', custom)!r}; not replacing it")
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"model: its loss is {loss_type!r}, not a causal language model's cross-entropy")
    model.loss_function = causal_lm_loss
    return model


__all__ = ["CrossEntropyFunction", "cross_entropy", "causal_lm_loss", "fast_loss"]
