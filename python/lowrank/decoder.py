"""``fast_decoder``: every op of a transformers decoder that lowrank has a kernel for, in one call."""

from __future__ import annotations

from torch import nn

from .attention import fast_attention
from .norm import fast_norm, fast_norms
from .swiglu import fast_swiglu, fast_swiglus


def fast_decoder(model: nn.Module, enabled: bool = True) -> nn.Module:
    """:func:`lowrank.fast_attention` (where ``model`` is a transformers model), :func:`lowrank.fast_norm`
    and :func:`lowrank.fast_swiglu` on ``model``: its causal attention, its RMSNorms and its gated MLPs'
    SiLU products on lowrank's CPU kernels, each where it applies (the others keep their own ops).
    ``enabled=False`` undoes all three. Returns ``model``. The adapters, the loss
    (:func:`lowrank.fast_loss`) and activation memory (:func:`lowrank.recompute_pointwise`) are separate
    choices."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "set_attn_implementation"):
        fast_attention(model, enabled=enabled)
    fast_norm(model, enabled=enabled)
    fast_swiglu(model, enabled=enabled)
    return model


def fast_decoder_report(model: nn.Module) -> dict:
    """What :func:`fast_decoder` changed on ``model``: the attention implementation (transformers models),
    and how many norms and MLPs run on lowrank's kernels."""
    config = getattr(model, "config", None)
    return {
        "attention": getattr(config, "_attn_implementation", None),
        "norms": fast_norms(model),
        "mlps": fast_swiglus(model),
    }


__all__ = ["fast_decoder", "fast_decoder_report"]
