"""Saved activations rebuilt in the backward from what autograd keeps anyway: ``recompute_pointwise``.

Most of a training step's memory is the activations autograd saves for the backward, and many of them
are the output of one pointwise op whose operands autograd saves as well:

- a gated MLP's ``act(gate) * up``: the down projection's adapter saves the product to compute its
  own gradient; the multiplication saves both factors;
- ``act(gate)``: the multiplication saves it; the activation saves ``gate``;
- an RMSNorm's output ``weight * (h * rsqrt(mean(h²) + eps))`` (in a bf16 model the inner product is
  fp32, cast to bf16): every adapter that reads it saves it; the norm's inner multiplication saves ``h``
  and the rsqrt, and the outer one ``weight``; under :func:`lowrank.fast_norm` the output of
  ``lowrank.rms_norm``, whose node saves ``x``, ``weight`` and the rows' ``rstd``;
- under :func:`lowrank.fast_swiglu` a gated MLP's ``lowrank.silu_mul(gate, up)``, whose node saves both.

Under :class:`PointwiseRecompute` each tensor autograd saves (through
``torch.autograd.graph.saved_tensors_hooks``) is looked at: when its ``grad_fn`` is one such op (a
product of two tensors, SiLU, GELU, or a view of one of them) and every operand is either saved on
that node or is itself such an output (at most two ops deep, through a cast to a 16-bit product's own
dtype), what is stored is the recipe, not the tensor. The backward that needs it runs the op again on
the same saved operands: the same kernel on the same inputs, so the same bits (the tests compare
gradients bit for bit). Nothing else changes: the forward does the same work, and the backward makes
each such tensor once (a tensor saved by several consumers, x by q, k and v, is one recipe, kept from
its first use to its last).

A consumer's backward always runs before its producer's (the producer needs the consumer's gradient),
so the operands a recipe reads are still held when it runs. A tensor that is still alive when the
backward wants it (another reference kept it) is used as it is, and raises autograd's error if it was
modified in place since it was saved. One that was modified in place and then dropped is not detected:
autograd would have refused such a program (a saved tensor modified in place), so no program that
runs without this can differ with it.

Not applied under ``torch.compile`` (its graphs already choose what to save and recompute), to tensor
subclasses, or to tensors under :data:`MIN_BYTES`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._hooks import has_forward_pre_hook, remove_forward_hooks

# Smaller saved tensors are stored: the bookkeeping would cost more than the memory is worth.
MIN_BYTES = 1 << 18
# How many pointwise ops back a recipe may reach for an operand its node did not save.
_MAX_DEPTH = 2

_state = threading.local()  # probing: a recipe's operands are being checked, not used

Make = Callable[[], Tensor]


class _Recipe:
    """A saved tensor that is not stored: how to make it again, and what it must look like. ``uses``:
    the unpacks one backward will ask of it (the SavedVariables that hold it, and the recipes that read
    it); the tensor made for the first is kept for the rest (x read by q, k and v, made once)."""

    __slots__ = ("make", "shape", "stride", "dtype", "ref", "version", "uses", "made")

    def __init__(self, make: Make, t: Tensor):
        self.make = make
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.ref = weakref.ref(t)
        self.version = t._version
        self.uses = 1
        self.made: Optional[Tensor] = None


def _probe(node, attr: str, reads: list) -> Optional[Tensor]:
    """The operand ``attr`` that ``node`` saved, or None; one that is itself a recipe reads as an empty
    tensor of its dtype (it is not rebuilt to be looked at) and goes into ``reads``."""
    _state.probing, _state.probed = True, []
    try:
        value = getattr(node, attr)
    finally:
        _state.probing = False
    reads += _state.probed
    return value


def _producer(node, index: int, depth: int, reads: list) -> Optional[Make]:
    """How to make ``node``'s input ``index`` again from its producer, or None."""
    producer, output = node.next_functions[index]
    if producer is None or output != 0 or depth >= _MAX_DEPTH:
        return None
    return _plan(producer, depth + 1, None, reads)


def _cast_producer(node, index: int, depth: int, dtype: torch.dtype, reads: list):
    """An input made by a cast to ``dtype`` (``ToCopyBackward0``) of something :func:`_plan` can make
    again, as a function of the device the product ran on (the cast's own target)."""
    producer, output = node.next_functions[index]
    if producer is None or output != 0 or depth >= _MAX_DEPTH or type(producer).__name__ != "ToCopyBackward0":
        return None
    source = _producer(producer, 0, depth + 1, reads)
    return None if source is None else lambda device: source().to(device=device, dtype=dtype)


def _plan(node, depth: int, dtype: Optional[torch.dtype], reads: list) -> Optional[Make]:
    """How to make ``node``'s output (of ``dtype`` where known) again from what the graph holds, or None;
    the recipes the plan reads are added to ``reads``."""
    kind = type(node).__name__
    if kind == "MulBackward0":
        saved = []  # the recipes among the saved operands
        a, b = _probe(node, "_saved_self", saved), _probe(node, "_saved_other", saved)
        if a is not None and b is not None:
            reads += saved
            return lambda: torch.mul(node._saved_self, node._saved_other)
        if a is None and b is None:
            return None
        index, attr, kept = (1, "_saved_self", a) if a is not None else (0, "_saved_other", b)
        made = []  # the recipes the unsaved operand's own plan reads
        missing = _producer(node, index, depth, made)
        if missing is not None:
            reads += saved + made
            return lambda: _product(getattr(node, attr), missing(), index)
        # An RMSNorm's ``weight * h.to(weight.dtype)`` in a 16-bit model: the only floating dtype that
        # leaves a 16-bit product's dtype unchanged next to an operand of that dtype is that dtype.
        if dtype in (torch.bfloat16, torch.float16) and kept.dtype == dtype:
            made = []
            cast = _cast_producer(node, index, depth, dtype, made)
            if cast is not None:
                reads += saved + made
                return lambda: _product_cast(getattr(node, attr), cast, index)
        return None
    if kind in ("SiluBackward0", "GeluBackward0"):
        mine = []
        if _probe(node, "_saved_self", mine) is None:
            return None
        reads += mine
        if kind == "SiluBackward0":
            return lambda: nn.functional.silu(node._saved_self)
        approximate = node._saved_approximate
        return lambda: nn.functional.gelu(node._saved_self, approximate=approximate)
    if kind == "RMSNormFunctionBackward":  # lowrank.rms_norm's output, from the x, weight and rstd it saved
        mine = []
        if _probe(node, "saved_tensors", mine) is None:
            return None
        reads += mine
        eps = node.eps
        return lambda: _rms_norm_again(node.saved_tensors, eps)
    if kind == "SiLUMulFunctionBackward":  # lowrank.silu_mul's output, from the gate and up it saved
        mine = []
        if _probe(node, "saved_tensors", mine) is None:
            return None
        reads += mine
        return lambda: _silu_mul_again(node.saved_tensors)
    if kind in ("ViewBackward0", "UnsafeViewBackward0") and depth == 0:
        # a view of such an output (a Linear's 2-D view of its 3-D input): its shape is the saved tensor's
        return _producer(node, 0, depth, reads)
    return None


def _rms_norm_again(saved: tuple, eps: float) -> Tensor:
    """The output of lowrank.rms_norm from what its node saved: the same kernel on the same x and weight
    (the same rstd, the same bits)."""
    from .norm import rms_norm_forward

    x, weight, _ = saved
    return rms_norm_forward(x, weight, eps)[0]


def _silu_mul_again(saved: tuple) -> Tensor:
    """The output of lowrank.silu_mul from the gate and up its node saved (the same kernel: the same bits)."""
    from .swiglu import silu_mul_forward

    return silu_mul_forward(*saved)


def _product(kept: Tensor, made: Tensor, made_index: int) -> Tensor:
    """The product with its operands in their original order (``made`` was input ``made_index``)."""
    return torch.mul(kept, made) if made_index == 1 else torch.mul(made, kept)


def _product_cast(kept: Tensor, cast: Callable[[torch.device], Tensor], made_index: int) -> Tensor:
    return _product(kept, cast(kept.device), made_index)


def _pack(t: Tensor):
    node = t.grad_fn
    if node is None or type(t) is not Tensor or t.numel() * t.element_size() < MIN_BYTES:
        return t
    memo = _state.memo[-1] if getattr(_state, "memo", None) else None
    if memo is not None:
        seen = memo.get(id(t))
        if seen is not None and seen.ref() is t and seen.version == t._version:
            seen.uses += 1  # the same tensor saved again (x by q, k and v): one recipe, made once
            return seen
    reads = []
    make = _plan(node, 0, t.dtype, reads)
    if make is None:
        return t
    for recipe in reads:
        recipe.uses += 1
    recipe = _Recipe(make, t)
    if memo is not None:
        memo[id(t)] = recipe
    return recipe


def _unpack(packed):
    if type(packed) is not _Recipe:
        return packed
    if getattr(_state, "probing", False):
        _state.probed.append(packed)
        return torch.empty(0, dtype=packed.dtype)
    alive = packed.ref()
    if alive is not None:  # still held elsewhere: no need to make it again
        if alive._version != packed.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a tensor of shape {list(packed.shape)} is at version {alive._version}; expected version "
                f"{packed.version} instead (lowrank.PointwiseRecompute)"
            )
        return alive
    t = packed.made
    if t is None:
        with torch.no_grad():
            t = packed.make()
        if t.shape != packed.shape:  # (a view's recipe makes its base)
            t = t.reshape(packed.shape)
        if t.dtype != packed.dtype:  # the same op on the same operands: never seen
            raise RuntimeError(f"lowrank.PointwiseRecompute: rebuilt a {t.dtype} tensor for a saved {packed.dtype} one")
        if t.stride() != packed.stride:  # the same values in the layout the consumer saved
            t = torch.empty_strided(packed.shape, packed.stride, dtype=t.dtype, device=t.device).copy_(t)
    packed.uses -= 1
    packed.made = t if packed.uses > 0 else None  # (a second backward, retain_graph: made again)
    return t


class PointwiseRecompute(torch.autograd.graph.saved_tensors_hooks):
    """A context: tensors saved for the backward inside it that one pointwise op makes from operands
    autograd keeps anyway are rebuilt in the backward instead of stored (see the module docstring).
    :func:`recompute_pointwise` puts a model's forward inside one."""

    def __init__(self):
        super().__init__(_pack, _unpack)

    def __enter__(self):
        _state.__dict__.setdefault("memo", []).append({})  # id(tensor) -> its recipe, for this forward
        return super().__enter__()

    def __exit__(self, *exc):
        _state.memo.pop()
        return super().__exit__(*exc)


_scopes = threading.local()  # per thread: (module, scope or None) for each forward entered


def _enter(module: nn.Module, args, kwargs) -> None:
    scope = None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        scope = PointwiseRecompute()
        scope.__enter__()
    _scopes.__dict__.setdefault("stack", []).append((module, scope))


def _exit(module: nn.Module, args, kwargs, output):
    stack = _scopes.__dict__.get("stack")
    # (an always-called hook: it also runs when an earlier pre-hook raised before _enter did)
    if stack and stack[-1][0] is module:
        scope = stack.pop()[1]
        if scope is not None:
            scope.__exit__(None, None, None)
    return output


def recompute_pointwise(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run ``model``'s forward under :class:`PointwiseRecompute`: the same results and gradients (bit for
    bit), less memory held between forward and backward (a gated MLP's activation and product, the
    norms' outputs that adapters save), for one pointwise pass per such tensor in the backward. Any
    ``nn.Module`` (a lowrank model, a PEFT one, a plain one); ``enabled=False`` takes it off. Returns
    ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    remove_forward_hooks(model, _enter, _exit)
    if enabled:
        model.register_forward_pre_hook(_enter, with_kwargs=True)
        model.register_forward_hook(_exit, with_kwargs=True, always_call=True)
    return model


def recomputes_pointwise(model: nn.Module) -> bool:
    """Whether :func:`recompute_pointwise` is on for ``model``."""
    return has_forward_pre_hook(model, _enter)


__all__ = ["PointwiseRecompute", "recompute_pointwise", "recomputes_pointwise"]
