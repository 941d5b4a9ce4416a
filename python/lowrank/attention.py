"""Causal self-attention on lowrank's CPU kernels (csrc/cpu/attention.cpp), for the decoder layers around
the adapters, and :func:`fast_attention` to make a transformers model use it.

On a CPU, torch's ``scaled_dot_product_attention`` is a large share of a small model's training step:
for SmolLM2-135M's shape (9 query heads over 3 key/value heads, head dimension 64) at 4 × 128 tokens its
bf16 forward and backward took 7.2 ms per layer on a Zen 5 VM (~26 G multiply-adds/s), a quarter of a
lowrank LoRA step. The kernel here computes the same function — grouped-query heads, key ``j`` visible to
query ``i`` when ``j <= i + S - T``, fp32 products and sums, each output rounded once to the inputs'
dtype — with one register-tiled product kernel over fp32 copies of each head, and its backward rebuilds
the probabilities from each row's log-sum-exp instead of keeping them.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from . import _C, _autocast
from ._autocast import off_in_backward
from ._validate import _DTYPES, check_tensor
from .ops import _direct, _runtime

_NATIVE = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256


def _view(t: Tensor) -> "_C.Strided4":
    """``t``'s kernel view, holding ``t`` (a copy made for the call lives until the kernel has read it)."""
    return _C.Strided4(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), _DTYPES[t.dtype], t)


def _head_rows(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension is contiguous (any other strides: HF's query is a transposed view)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _plain(t, dtype) -> bool:
    return isinstance(t, Tensor) and t.dtype == dtype and t.is_cpu and t.dim() == 4


def _check(query: Tensor, key: Tensor, value: Tensor, scale: float) -> tuple[int, ...]:
    if not (_plain(query, query.dtype) and query.dtype in _NATIVE and _plain(key, query.dtype)
            and _plain(value, query.dtype) and value.shape == key.shape):  # fmt: skip
        check_tensor("query", query, dtypes=_NATIVE, device="cpu", ndim=4)  # raises, naming the argument
        check_tensor("key", key, dtypes=(query.dtype,), device="cpu", ndim=4)
        check_tensor("value", value, dtypes=(query.dtype,), device="cpu", shape=tuple(key.shape))
    b, h, t, d = query.shape
    kb, kv, s, kd = key.shape
    if kb != b or kd != d:
        raise ValueError(f"key: expected shape [{b}, *, *, {d}] (query's batch and head dimension), got {list(key.shape)}")
    if min(b, h, kv, t, s, d) < 1:
        raise ValueError(f"query, key: every size must be positive, got {list(query.shape)} and {list(key.shape)}")
    if h % kv:
        raise ValueError(f"key: {kv} key/value heads do not divide the {h} query heads")
    if t > s:
        raise ValueError(f"query: {t} positions, more than the {s} keys (the causal mask is aligned bottom-right)")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"query: head dimension {d} above {MAX_HEAD_DIM}")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive number, got {scale!r}")
    return b, h, kv, t, s, d


def _key_ranges_address(key_ranges: Optional[Tensor], b: int) -> int:
    """The address of ``key_ranges`` ([B, 2] int64, 0 <= start <= end <= S: the C++ side checks the
    values), or 0."""
    if key_ranges is None:
        return 0
    check_tensor("key_ranges", key_ranges, dtypes=(torch.int64,), device="cpu", shape=(b, 2))
    if not key_ranges.is_contiguous():
        raise ValueError("key_ranges: expected a contiguous tensor")
    return key_ranges.data_ptr()


def attention_forward(query: Tensor, key: Tensor, value: Tensor, scale: float,
                      key_ranges: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, lse)``: causal grouped-query attention of ``query`` [B, H, T, D] over ``key`` / ``value``
    [B, KV, S, D] (fp32 or bf16, CPU), ``out`` [B, H, T, D] in query's dtype — a view of a contiguous
    [B, T, H, D] buffer, the layout transformers' attention functions return — and ``lse`` [B, H, T]
    (fp32) each query row's log-sum-exp of its scaled scores (−inf for a row that sees no key).
    ``key_ranges`` ([B, 2] int64, or None): batch b's queries see only keys in ``[key_ranges[b, 0],
    key_ranges[b, 1])`` (a padded batch)."""
    sizes = _check(query, key, value, scale)
    b, h, _, t, _, d = sizes
    ranges = _key_ranges_address(key_ranges, b)
    query, key, value = _head_rows(query), _head_rows(key), _head_rows(value)
    out = _runtime.empty(b, t, h, d, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = _runtime.empty(b, h, t, dtype=torch.float32, device=query.device)
    _C.attention_cpu(_view(query), _view(key), _view(value), _view(out), lse.data_ptr(), list(sizes), float(scale),
                     _runtime.num_threads(), ranges)  # fmt: skip
    return out, lse


def attention_backward(grad_out, query, key, value, lse, scale,
                       key_ranges: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(grad_query, grad_key, grad_value)`` of :func:`attention_forward`'s ``out`` (contiguous, in
    query's dtype), from the inputs and ``lse`` (the probabilities are rebuilt; ``out`` is not needed)."""
    sizes = _check(query, key, value, scale)
    check_tensor("grad_out", grad_out, dtypes=(query.dtype,), device="cpu", shape=tuple(query.shape))
    ranges = _key_ranges_address(key_ranges, sizes[0])
    query, key, value, grad_out = (_head_rows(x) for x in (query, key, value, grad_out))
    dq, dk, dv = (_runtime.empty(*x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))
    _C.attention_backward_cpu(_view(query), _view(key), _view(value), lse.data_ptr(), list(sizes), float(scale),
                              _view(grad_out), _view(dq), _view(dk), _view(dv),
                              _runtime.num_threads(), ranges)  # fmt: skip
    return dq, dk, dv


class CausalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, key_ranges=None):
        out, lse = attention_forward(query, key, value, scale, key_ranges)
        ctx.save_for_backward(query, key, value, lse, key_ranges)
        ctx.scale = scale
        return out

    @staticmethod
    @off_in_backward
    def backward(ctx, grad_out):
        query, key, value, lse, key_ranges = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, query, key, value, lse, ctx.scale, key_ranges)
        return dq, dk, dv, None, None


def causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float] = None, *,
                     key_ranges: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """``softmax(scale · Q Kᵀ + causal mask) V`` with grouped-query heads (``query`` [B, H, T, D], ``key``
    and ``value`` [B, KV, S, D], H a multiple of KV; key ``j`` visible to query ``i`` when ``j <= i + S - T``),
    on lowrank's CPU kernels, differentiable. ``scale`` defaults to ``D ** -0.5``. ``key_ranges`` ([B, 2]
    int64, ``0 <= start <= end <= S``) also hides batch b's keys outside ``[start, end)``: a padded
    batch's mask (right padding ends the range, left padding starts it). A query that then sees no key
    (a left pad) gets zeros, as under torch's SDPA. Returns [B, H, T, D] (a view of a contiguous
    [B, T, H, D] buffer)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if not torch.is_grad_enabled() or not (query.requires_grad or key.requires_grad or value.requires_grad):
        return attention_forward(query, key, value, scale, key_ranges)[0]  # nothing to differentiate (decode)
    return _direct.apply(CausalAttentionFunction, query, key, value, scale, key_ranges)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
NAME = "lowrank"


# The last mask read: (weakref to the mask, its version, its key ranges or None). transformers builds one
# mask per forward and hands it to every layer: it is read once.
_mask_memo = threading.local()


def padding_key_ranges(mask: Tensor, t: int, s: int) -> Optional[Tensor]:
    """``mask`` ([B, 1, T, S] bool, True = attend, as transformers' ``sdpa_mask`` makes it) as per-batch
    key ranges ([B, 2] int64, ``[start, end)``) when it is exactly the bottom-right causal mask with
    each batch's keys outside one range hidden — a padded batch, right or left — else None (any other
    mask: packed sequences, holes, sliding windows, a float mask)."""
    if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] == t and mask.shape[3] == s and mask.device.type == "cpu"):  # fmt: skip
        return None
    memo = getattr(_mask_memo, "last", None)
    if memo is not None and memo[0]() is mask and memo[1] == mask._version:
        return memo[2]
    last = mask[:, 0, -1, :]  # the last query sees every key of its range
    count = last.sum(-1)
    start = torch.where(count > 0, last.to(torch.uint8).argmax(-1), 0)
    end = start + count
    keys = torch.arange(s)
    causal = keys[None, :] <= torch.arange(t)[:, None] + (s - t)
    inside = (keys[None, :] >= start[:, None]) & (keys[None, :] < end[:, None])
    found = torch.stack([start, end], 1).contiguous() if torch.equal(mask[:, 0], causal[None] & inside[:, None]) else None
    _mask_memo.last = (weakref.ref(mask), mask._version, found)
    return found


def _usable(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        bool(causal)
        and (dropout == 0.0 or not module.training)
        and all(kwargs.get(k) is None for k in ("position_bias", "softcap", "sliding_window", "s_aux"))
        and not kwargs.get("output_attentions", False)
        and all(type(t) is Tensor and t.device.type == "cpu" and t.dtype == query.dtype for t in (query, key, value))
        and query.dtype in _NATIVE
        and query.dim() == 4
        and query.shape[-1] <= MAX_HEAD_DIM
        and query.shape[1] % key.shape[1] == 0
        and not torch.compiler.is_compiling()
    )


def transformers_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                           is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:  # fmt: skip
    """A transformers attention function (``AttentionInterface``): :func:`causal_attention` where the call
    is one it computes — no mask tensor (transformers passes none when the mask is plain causal: training,
    prefill, decode) or a padded batch's mask (:func:`padding_key_ranges`: right padding in training,
    left padding in batched generation), a causal decoder module, no dropout in training, CPU fp32/bf16 —
    and transformers' own SDPA function otherwise (packed or other masks, sliding windows, other
    devices, ``torch.compile``)."""
    dtype = _autocast.dtype_for(query)
    if dtype is not None:  # autocast casts SDPA's query, key and value to its dtype: so here too
        query, key, value = (_autocast.cast(t, dtype) for t in (query, key, value))
        with _autocast.off(query):
            return transformers_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                          **kwargs)  # fmt: skip
    usable = _usable(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    ranges = None
    if usable and attention_mask is not None:
        ranges = padding_key_ranges(attention_mask, query.shape[2], key.shape[2])
        usable = ranges is not None
    if not usable:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    t, s = query.shape[2], key.shape[2]
    if 1 < t < s and ranges is None:  # no mask, more keys than queries: an empty static cache's prefill (as sdpa)
        key, value = key[:, :, :t], value[:, :, :t]
    out = causal_attention(query, key, value, scaling, key_ranges=ranges)
    return out.transpose(1, 2), None  # [B, T, H, D], contiguous


def fast_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make a transformers model run its attention on :func:`transformers_attention` (registered as
    ``attn_implementation="lowrank"``, with SDPA's mask rules, so a plain causal mask arrives as None);
    ``enabled=False`` gives it back SDPA. Returns ``model``. The same function of the same inputs as
    transformers' SDPA path, within fp32 rounding (both sum in fp32; the outputs round once to the
    model's dtype)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, transformers_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME if enabled else "sdpa")
    return model
