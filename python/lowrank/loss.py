"""The language-modelling loss on lowrank's cross-entropy kernels (lowrank/ops/loss.py).

    loss = lowrank.cross_entropy(logits, labels)            # like F.cross_entropy over the last dim, in fp32
    lowrank.fast_loss(model)                                # a transformers causal LM's loss on these kernels
    lowrank.fast_loss(model, keep_logits=False)             # ...and its output head fused into the loss
    loss = lowrank.linear_cross_entropy(hidden, head.weight, labels)  # a head and its loss, fused

A training step of a small model spends a large share of its time in the loss: SmolLM2-135M's
vocabulary has 49152 entries, so 512 tokens make a 25 M-element logits matrix, and transformers' loss
upcasts it to fp32, keeps an fp32 log-softmax of it for the backward and builds the gradient through a
zero-filled one-hot matrix. The kernels compute the same fp32 loss keeping one float per row, and the
backward reads the logits once and writes their gradient once. With ``keep_logits=False`` a training
forward with labels never holds the whole logits matrix: the output head and the loss run together,
a few rows at a time, through one reused workspace (:class:`HeadLossFunction`).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor, nn

from . import _autocast
from ._autocast import off_in_backward
from ._hooks import remove_forward_hooks
from ._validate import check_tensor
from .layers.frozen import FrozenLinear
from .ops import _direct, _gemm
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
    @off_in_backward
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


# ---------------------------------------------------------------------------------------------
# The output head fused into the loss (fast_loss(model, keep_logits=False))
# ---------------------------------------------------------------------------------------------
# Rows per chunk: about _CHUNK_BYTES of logits, and never fewer than _MIN_CHUNK_ROWS. Each chunk is two
# GEMMs against the whole head, and a GEMM packs the whole head for each call: on the Zen 4, SmolLM2's
# head (576 x 49152) in 85-row fp32 chunks took 569 ms against 373 ms unfused for 512 tokens; in
# 256-row ones about the same as unfused.
_CHUNK_BYTES = 32 << 20
_MIN_CHUNK_ROWS = 256
_head_state = threading.local()  # defer: the next head call returns a stand-in; pending: one was returned


class HeadLossFunction(torch.autograd.Function):
    """``scale · Σ_i CE(hidden[i] Wᵀ + bias, labels[i])`` (fp32; fp64 for fp64) with the logits made a
    chunk of rows at a time in one workspace and never kept: each chunk's logits (the head's GEMM, in
    hidden's dtype, as the head computes them), its per-row losses, then in the same memory its gradient
    ``scale·(softmax − one-hot)`` and from it the gradients of hidden, W and bias, which the backward
    scales by the incoming gradient. The head's backward GEMMs thus run in the forward (as a fused loss
    must, having dropped the logits), and the step allocates nothing the size of the logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                scale: float):  # fmt: skip
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        rows = max(1, min(n, max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // max(1, v * hidden.element_size()))))
        # The chunk workspace: on the CPU the thread's reused buffer (ops/loss.py), on CUDA torch's cache.
        flat = (_loss._grad_buffer(torch.Size([rows * v]), hidden.dtype) if hidden.device.type == "cpu"
                else torch.empty(rows * v, dtype=hidden.dtype, device=hidden.device))  # fmt: skip
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        weight_t = weight.t()
        onednn = _gemm.onednn_for(hidden, weight)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            h, lab = hidden[start:end], labels[start:end]
            logits = flat[: (end - start) * v].view(end - start, v)
            if onednn:  # the faster GEMM writes a fresh chunk: copied into the workspace that the rest reuses
                logits.copy_(_gemm.linear(h, weight, bias=bias))
            else:
                torch.mm(h, weight_t, out=logits)
                if bias is not None:
                    logits += bias
            loss_rows, lse = _loss._forward_native(logits, lab, ignore_index)
            total += loss_rows.sum()
            if need_h or need_w or need_b:
                grad_loss = torch.full((end - start,), scale, dtype=acc, device=hidden.device)
                _loss.backward_into(logits, grad_loss, logits, lab, lse, ignore_index)  # in place
                if need_h:
                    if onednn:
                        grad_h[start:end] = _gemm.mm(logits, weight)
                    else:
                        torch.mm(logits, weight, out=grad_h[start:end])
                if need_w:
                    grad_w.addmm_(logits.t().to(acc), h.to(acc))
                if need_b:
                    grad_b += logits.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    @off_in_backward
    def backward(ctx, grad: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = None if grad_h is None else grad_h * grad.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad).to(w_dtype)
        db = None if grad_b is None else (grad_b * grad).to(b_dtype)
        return dh, dw, db, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean") -> Tensor:  # fmt: skip
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ...)``: an output head and the
    loss in one (:class:`HeadLossFunction`), for ``hidden [..., H]``, ``weight [V, H]`` (and ``bias
    [V]``) of one float dtype and ``labels [...]`` int64; ``reduction`` "mean" (over labels that are not
    ``ignore_index``; NaN when there are none, as torch's) or "sum". Returned in fp32 (fp64 for fp64).

    The logits are made a chunk of rows at a time in one reused workspace and never kept; the head's
    GEMMs are the measured fastest on this machine (ops/_gemm.py). Where a gradient is wanted, the
    gradients of ``hidden``, ``weight`` and ``bias`` are computed in this forward (the backward only
    scales them), so call it where the loss will be backpropagated, or under ``no_grad``.
    """
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"hidden: expected a floating-point tensor, got {str(hidden.dtype).replace('torch.', '')}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected at least 1 dimension (features last), got a scalar")
    h = hidden.shape[-1]
    check_tensor("weight", weight, dtypes=(hidden.dtype,), device=hidden.device, ndim=2)
    if weight.shape[1] != h:
        raise ValueError(f"weight: expected [classes, {h}] to match hidden's last dimension {h}, got {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), device=hidden.device, shape=(weight.shape[0],))
    check_tensor("labels", labels, dtypes=(torch.int64,), device=hidden.device)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {list(hidden.shape[:-1])} (hidden's shape without its last dimension), "
            f"got {list(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum' (the fused head keeps no per-row losses), got {reduction!r}")
    n = labels.numel()
    flat = labels.reshape(n).contiguous()
    scale = 1.0 if reduction == "sum" else _mean_scale(flat, ignore_index)
    return _head_loss_function(hidden.reshape(n, h), weight, bias, flat, int(ignore_index), scale)


def _head_loss_function(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                        scale: float) -> Tensor:  # fmt: skip
    """:class:`HeadLossFunction` on ``hidden`` [N, H]. Under ``torch.autocast`` the head's operands are cast
    to autocast's dtype first, as ``F.linear`` casts them (the loss stays fp32, as autocast's
    cross-entropy), and the function runs with autocast off (lowrank/_autocast.py)."""
    dtype = _autocast.dtype_for(hidden)
    if dtype is not None:
        hidden, weight, bias = (_autocast.cast(t, dtype) for t in (hidden, weight, bias))
        with _autocast.off(hidden):
            return HeadLossFunction.apply(hidden.contiguous(), weight, bias, labels, ignore_index, scale)
    return HeadLossFunction.apply(hidden.contiguous(), weight, bias, labels, ignore_index, scale)


def _mean_scale(labels: Tensor, ignore_index: int) -> float:
    """1 / the number of labels that are not ``ignore_index``; NaN when there are none (torch's mean over
    no labels is NaN)."""
    valid = int((labels != ignore_index).sum())
    return 1.0 / valid if valid else float("nan")


class _StandInHead(nn.Linear):
    """The output head of a model under ``fast_loss(model, keep_logits=False)`` (the same module, its
    class swapped: the same parameters, state-dict keys and tying). Inside a training forward with
    labels it returns a stand-in for its logits, NaN and of their shape, that carries its input; the
    loss then runs the head itself (HeadLossFunction). Any other call is the forward of the class it
    had (``_unfused_class``: nn.Linear, or lowrank's FrozenLinear for a head ``inject`` froze)."""

    def forward(self, x: Tensor) -> Tensor:
        if not getattr(_head_state, "defer", False):
            return self.__dict__.get("_unfused_class", nn.Linear).forward(self, x)
        _head_state.defer = False
        stand_in = x.new_full((), float("nan")).expand(*x.shape[:-1], self.out_features)
        stand_in._lowrank_head = (x, self.weight, self.bias)
        _head_state.pending = True
        return stand_in


def _defer_head_pre_hook(module: nn.Module, args, kwargs) -> None:
    _head_state.defer = module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None
    _head_state.pending = False


def _defer_head_hook(module: nn.Module, args, kwargs, output):
    _head_state.defer = False
    logits = getattr(output, "logits", None)
    if logits is not None and hasattr(logits, "_lowrank_head"):
        output.logits = None  # (a ModelOutput: the field and its dict entry)
    return output


def _head_loss(head, labels: Tensor, ignore_index: int, num_items_in_batch, shift_labels) -> Tensor:
    hidden, weight, bias = head
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    n = shift_labels.numel()
    if hidden.numel() != n * hidden.shape[-1]:
        raise ValueError(f"labels: {list(shift_labels.shape)} labels for hidden states of shape {list(hidden.shape)}")
    labels2 = shift_labels.reshape(n).contiguous()
    scale = _mean_scale(labels2, ignore_index) if num_items_in_batch is None else 1.0 / float(num_items_in_batch)
    return _head_loss_function(hidden.reshape(n, hidden.shape[-1]), weight, bias, labels2, ignore_index, scale)


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
    head = getattr(logits, "_lowrank_head", None)
    if getattr(_head_state, "pending", False):
        _head_state.pending = False
        if head is None:
            raise RuntimeError(
                "fast_loss(model, keep_logits=False): this model changes its logits between the output head and "
                "the loss (a soft cap, a scale, ...), which the fused head does not do; use keep_logits=True"
            )
    if head is not None:
        if not isinstance(labels, Tensor) and shift_labels is None:
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        return _head_loss(head, labels, ignore_index, num_items_in_batch, shift_labels)
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


def _unfuse_head(model: nn.Module) -> None:
    remove_forward_hooks(model, _defer_head_pre_hook, _defer_head_hook)
    head = model.get_output_embeddings()
    if type(head) is _StandInHead:
        head.__class__ = head.__dict__.pop("_unfused_class", nn.Linear)


def fast_loss(model: nn.Module, enabled: bool = True, keep_logits: bool = True) -> nn.Module:
    """Make a transformers causal language model (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) compute
    its loss (``model(input_ids, labels=labels).loss``) with :func:`causal_lm_loss`; ``enabled=False``
    gives it back transformers' own. Returns ``model``.

    The loss is the same function of the logits (fp32, the same shift, reduction and
    ``num_items_in_batch``), and the outputs keep their logits: only the kernels and what they store
    differ. A model whose loss is not the causal-LM cross-entropy is refused.

    ``keep_logits=False`` also fuses the output head (an ``nn.Linear``) into the loss in training
    forwards given ``labels=`` (as a keyword, with gradients enabled): the logits are made a few rows at
    a time in one reused workspace and never kept, so the step holds nothing the size of the logits,
    and such a forward returns ``logits=None``. Every other forward (eval, ``no_grad``, no labels,
    ``generate``) is unchanged. A model that changes its logits between the head and the loss (a soft
    cap) is refused at its first such forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(getattr(type(model), "loss_function", None), property):
        raise ValueError(f"model: {type(model).__name__} has no transformers loss_function to replace")
    custom = model.__dict__.get("_loss_function")
    if not enabled:
        _unfuse_head(model)
        if custom is causal_lm_loss:
            del model._loss_function
        return model
    if custom is not None and custom is not causal_lm_loss:
        raise ValueError(f"model: its loss_function was set to {getattr(custom, '__name__', custom)!r}; not replacing it")
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"model: its loss is {loss_type!r}, not a causal language model's cross-entropy")
    if not keep_logits:
        head = model.get_output_embeddings()
        if type(head) not in (nn.Linear, FrozenLinear, _StandInHead):
            raise ValueError(
                f"keep_logits: the fused head needs an nn.Linear output head, this model's is {type(head).__name__}"
            )
    model.loss_function = causal_lm_loss
    _unfuse_head(model)
    if not keep_logits:
        head = model.get_output_embeddings()
        head._unfused_class = type(head)  # (a plain attribute: restored by _unfuse_head)
        head.__class__ = _StandInHead
        model.register_forward_pre_hook(_defer_head_pre_hook, with_kwargs=True)
        model.register_forward_hook(_defer_head_hook, with_kwargs=True)
    return model


__all__ = ["CrossEntropyFunction", "HeadLossFunction", "cross_entropy", "causal_lm_loss", "fast_loss"]
