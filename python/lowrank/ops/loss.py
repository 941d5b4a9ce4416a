"""Cross-entropy ops: schema, reference, fake, CPU and CUDA kernels, all in one place.

    lse[i]  = log Σ_j exp(logits[i, j])
    loss[i] = lse[i] − logits[i, labels[i]]          (0 where labels[i] == ignore_index)
    ∂loss[i]/∂logits[i, j] = softmax(logits[i])[j] − [j == labels[i]]

    logits: [N, V] (its rows may be strided)   labels: [N] int64   loss, lse: [N] fp32 (fp64 for fp64)

The loss of a causal language model, computed in fp32 from the logits as they are (bf16 is widened
exactly), as transformers' loss computes it after ``logits.float()``. What differs is what is stored:
torch's ``cross_entropy`` keeps an fp32 log-softmax matrix for its backward and builds its gradient from
a zero-filled one-hot matrix, three or four passes over ``N·V`` fresh memory; these kernels keep ``lse``
(a float per row) and the logits the caller already holds, and the backward reads the logits once and
writes the gradient once (csrc/loss.h, csrc/cpu/cross_entropy.cpp).

Ops (``torch.ops.lowrank.*``):

- ``cross_entropy_forward(logits, labels, ignore_index) -> (loss, lse)``
- ``cross_entropy_backward(grad_loss, logits, labels, lse, ignore_index) -> grad_logits`` (logits' dtype:
  ``grad_loss[i]·(softmax − one-hot)``, 0 in ignored rows)

A label that is neither ``ignore_index`` nor in ``[0, V)`` raises ``ValueError`` naming ``labels`` (on
CUDA the check reads the labels back: one synchronization per call). dtypes: fp32/bf16 on CPU,
fp32/bf16/fp16 on CUDA; anything else runs the reference.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .. import _C
from .._autocast import off_in_backward
from .._validate import check_tensor, cuda_stream, last_dim_contiguous, matrix
from . import _direct, _runtime

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_NATIVE = (torch.float32, torch.bfloat16)
_CUDA_NATIVE = (torch.float32, torch.bfloat16, torch.float16)
HAS_CUDA_KERNELS = hasattr(_C, "cross_entropy_cuda")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every kernel, the fake one included, so bad input fails at trace time)
# ---------------------------------------------------------------------------------------------
def _check(logits, labels, ignore_index) -> None:
    check_tensor("logits", logits, dtypes=_FLOATS, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64,), device=logits.device, shape=(logits.shape[0],))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def _check_backward(grad_loss, logits, labels, lse, ignore_index) -> None:
    _check(logits, labels, ignore_index)
    n = logits.shape[0]
    check_tensor("lse", lse, dtypes=(_acc(logits.dtype),), device=logits.device, shape=(n,))
    check_tensor("grad_loss", grad_loss, dtypes=_FLOATS, device=logits.device, shape=(n,))


def _check_label_values(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    """Every label is ignore_index or a column of logits (the C++ CPU launcher checks it again)."""
    v = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels: {int(labels[i])} at position {i} is not a class in [0, {v}) nor ignore_index ({ignore_index})"
        )


# ---------------------------------------------------------------------------------------------
# Reference kernels: the spec, in fp32 (fp64 for fp64 logits).
# ---------------------------------------------------------------------------------------------
def cross_entropy_forward_reference(logits, labels, ignore_index):
    _check(logits, labels, ignore_index)
    _check_label_values(logits, labels, ignore_index)
    acc = _acc(logits.dtype)
    valid = labels != ignore_index
    if logits.shape[1] == 0:  # no classes: every label is ignore_index (checked above)
        zeros = torch.zeros(logits.shape[0], dtype=acc, device=logits.device)
        return zeros, zeros.clone()
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=1)
    picked = x.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    zero = torch.zeros((), dtype=acc, device=logits.device)
    return torch.where(valid, lse - picked, zero), torch.where(valid, lse, zero)


def cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index):
    _check_backward(grad_loss, logits, labels, lse, ignore_index)
    _check_label_values(logits, labels, ignore_index)
    acc = _acc(logits.dtype)
    n, v = logits.shape
    if v == 0:
        return logits.new_empty((n, 0))
    valid = labels != ignore_index
    p = torch.exp(logits.to(acc) - lse.to(acc)[:, None])
    one_hot = torch.zeros_like(p).scatter_(1, torch.where(valid, labels, 0)[:, None], 1.0)
    grad = (p - one_hot) * grad_loss.to(acc)[:, None]
    return torch.where(valid[:, None], grad, torch.zeros((), dtype=acc, device=logits.device)).to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# Schemas. The decorated bodies are the default kernel (any device): the reference.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` per row, fp32 (fp64 for fp64 logits); 0 and 0 in ignored rows."""
    return cross_entropy_forward_reference(logits, labels, ignore_index)


@torch.library.custom_op("lowrank::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
    """``grad_loss[i]·(softmax(logits[i]) − one_hot(labels[i]))`` in logits' dtype, 0 in ignored rows."""
    return cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index)


@cross_entropy_forward.register_fake
def _(logits, labels, ignore_index):
    _check(logits, labels, ignore_index)
    n = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@cross_entropy_backward.register_fake
def _(grad_loss, logits, labels, lse, ignore_index):
    _check_backward(grad_loss, logits, labels, lse, ignore_index)
    return logits.new_empty(logits.shape)


# ---------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------
def _native(logits: Tensor) -> bool:
    if logits.device.type == "cpu":
        return logits.dtype in _CPU_NATIVE
    return logits.device.type == "cuda" and HAS_CUDA_KERNELS and logits.dtype in _CUDA_NATIVE


def _forward_native(logits, labels, ignore_index):
    _check(logits, labels, ignore_index)
    if not _native(logits):
        return cross_entropy_forward_reference(logits, labels, ignore_index)
    n = logits.shape[0]
    logits, labels = last_dim_contiguous(logits), labels.contiguous()
    loss = _runtime.empty(n, dtype=torch.float32, device=logits.device)
    lse = _runtime.empty(n, dtype=torch.float32, device=logits.device)
    args = (matrix("logits", logits), matrix("labels", labels), matrix("loss", loss), matrix("lse", lse), ignore_index)
    if logits.is_cuda:
        _check_label_values(logits, labels, ignore_index)
        with torch.cuda.device(logits.device):
            _C.cross_entropy_cuda(*args, cuda_stream(logits))
    else:
        _C.cross_entropy_cpu(*args, _runtime.num_threads())  # checks the labels' values itself
    return loss, lse


# The CPU backward's gradient is as large as the logits (50 MB for 512 tokens of a 49152-word vocabulary
# in bf16), and a fresh buffer that size comes from the kernel as untouched pages: on the 2-core Zen 4
# the page faults took 16 ms (bf16) and 32 ms (fp32) against 6 ms for the kernel's arithmetic. So each
# thread keeps the storage it handed out last and hands it out again once nothing else refers to it
# (autograd passes the gradient on and drops it, so from the second step on it is free); while anything
# still holds it (a hook, a retained .grad, a view) a fresh buffer is made instead. It is kept only past
# _REUSE_BYTES and grows to the largest size asked for; release_workspace() frees it.
_REUSE_BYTES = 1 << 20
_workspace = threading.local()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _only_ours(t: Tensor) -> bool:
    """True when the cached ``t`` is referred to by nothing but the cache: no other tensor handle, no view."""
    if _storage_use_count is None:  # (a private torch function: without it, never reuse)
        return False
    # The temporary UntypedStorage object adds one reference of its own.
    return t._use_count() == 1 and _storage_use_count(t.untyped_storage()._cdata) == 2


def _grad_buffer(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialized CPU tensor for the backward's gradient, or for lowrank.loss's fused-head chunks
    (see above)."""
    numel = shape.numel()
    if numel * dtype.itemsize < _REUSE_BYTES:
        return _runtime.empty(*shape, dtype=dtype, device="cpu")
    held = getattr(_workspace, "flat", None)
    if held is None or held.dtype != dtype or held.numel() < numel or not _only_ours(held):
        held = torch.empty(numel, dtype=dtype)
        _workspace.flat = held
    out = held[:numel].view(shape)
    return out.fill_(float("nan")) if _runtime.poison_outputs else out


def release_workspace() -> None:
    """Free this thread's cached buffer (the CPU backward's gradient, the fused head's chunks); it is made
    again when needed."""
    _workspace.flat = None


def _backward_native(grad_loss, logits, labels, lse, ignore_index):
    if not _native(logits):  # (the reference checks its arguments)
        return cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index)
    _check_backward(grad_loss, logits, labels, lse, ignore_index)  # before grad's shape is taken from logits
    if logits.is_cuda:  # (torch's caching allocator reuses memory on CUDA)
        grad = _runtime.empty(*logits.shape, dtype=logits.dtype, device=logits.device)
    else:
        grad = _grad_buffer(logits.shape, logits.dtype)
    return _backward_kernel(grad, grad_loss, logits, labels, lse, ignore_index)


def backward_into(grad: Tensor, grad_loss, logits, labels, lse, ignore_index) -> Tensor:
    """The backward written into ``grad`` (contiguous rows, logits' shape and dtype), which may be the
    logits themselves: the kernels read each element before they write it. Returns ``grad``."""
    _check_backward(grad_loss, logits, labels, lse, ignore_index)
    check_tensor("grad", grad, dtypes=(logits.dtype,), device=logits.device, shape=tuple(logits.shape))
    if not _native(logits):
        return grad.copy_(cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index))
    return _backward_kernel(grad, grad_loss, logits, labels, lse, ignore_index)


def _backward_kernel(grad: Tensor, grad_loss, logits, labels, lse, ignore_index) -> Tensor:
    """The CPU or CUDA backward kernel into ``grad``, on checked arguments."""
    logits, labels, lse = last_dim_contiguous(logits), labels.contiguous(), lse.contiguous()
    grad_loss = grad_loss.to(torch.float32).contiguous()  # often a stride-0 expand of a mean's scalar
    args = (matrix("grad", grad), matrix("logits", logits), matrix("labels", labels), matrix("lse", lse),
            matrix("grad_loss", grad_loss), ignore_index)  # fmt: skip
    if logits.is_cuda:
        _check_label_values(logits, labels, ignore_index)
        with torch.cuda.device(logits.device):
            _C.cross_entropy_backward_cuda(*args, cuda_stream(logits))
    else:
        _C.cross_entropy_backward_cpu(*args, _runtime.num_threads())
    return grad


for _device in ("cpu", "cuda"):
    cross_entropy_forward.register_kernel(_device)(_forward_native)
    cross_entropy_backward.register_kernel(_device)(_backward_native)


# ---------------------------------------------------------------------------------------------
# Autograd (the formula lowrank/autograd.py's CrossEntropyFunction uses too). The saved logits are the
# caller's own tensor, not a copy; lse takes no gradient.
# ---------------------------------------------------------------------------------------------
def forward_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index


def forward_backward(ctx, grad_loss, grad_lse):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None
    logits, labels, lse = ctx.saved_tensors
    op = _backward_native if _direct.ok(logits) else torch.ops.lowrank.cross_entropy_backward
    return op(grad_loss, logits, labels, lse, ctx.ignore_index), None, None


cross_entropy_forward.register_autograd(off_in_backward(forward_backward), setup_context=forward_setup_context)
