"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter, ``y = x Wᵀ + b + s·B A dropout(x)``.

Follows PEFT's definition so adapters interoperate: ``lora_A.weight`` [r, in] Kaiming-uniform,
``lora_B.weight`` [out, r] zeros (a fresh adapter is the identity), ``s = alpha / r`` or
``alpha / sqrt(r)`` with rsLoRA, dropout on the adapter input only. The base ``weight``/``bias``
keep ``nn.Linear``'s names, are frozen, and a plain ``nn.Linear`` state dict loads into the layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _autocast
from ..autograd import LoRALinearFunction
from ..ops import _direct, _runtime
from ..ops._direct import param, submodule
from ..ops import lora as _lora_ops


def check_probability(name: str, value) -> None:
    """A dropout probability: a number in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")


def lora_call(args: tuple, frozen: Optional[_lora_ops.FrozenOperands]) -> Tensor:
    """A LoRA layer's output for ``args`` = ``(x, weight, bias, lora_a, lora_b, scale, adapter_input)``
    (``frozen``: the layer's kernel views of the same base and factors, built once): the autograd
    Function where a gradient may be wanted, else the kernel itself. Under ``torch.autocast`` x, W, the
    bias and the adapter input are cast to autocast's dtype first, as ``F.linear`` casts them, and the
    kernels run with autocast off (lowrank/_autocast.py); decoding over an fp32 W reads W as it is
    (``ops.lora.fp32_rows_under_autocast``)."""
    x = args[0]
    dtype = _autocast.dtype_for(x)
    if dtype is not None:
        x, weight, bias, lora_a, lora_b, scale, adapter_input = args
        if adapter_input is None and _lora_ops.fp32_rows_under_autocast(x, weight, _runtime.cpu_fused_max_m):
            # decoding: the fused rows over the fp32 W as it is, x and the output rounded as autocast rounds them
            a, b = _autocast.cast(lora_a, torch.float32), _autocast.cast(lora_b, torch.float32)
            with _autocast.off(x):
                y = lora_call((x.to(dtype).float(), weight, _autocast.cast(bias, torch.float32), a, b, scale, None),
                              frozen if a is lora_a else None)  # fmt: skip
            return y.to(dtype)
        cast = (_autocast.cast(x, dtype), _autocast.cast_frozen(weight, dtype), _autocast.cast(bias, dtype),
                _autocast.cast(adapter_input, dtype))  # fmt: skip
        if cast[1] is not weight:
            frozen = None  # a fresh copy of W each call: nothing to keep views of
        args = (*cast[:3], *_autocast.cast_adapter(dtype, lora_a, lora_b), scale, cast[3])
        with _autocast.off(x):
            return lora_call(args, frozen)
    if torch.is_grad_enabled():
        return _direct.apply(LoRALinearFunction, *args, frozen)[0]
    if args[6] is None and frozen is not None:  # inference: the kernel with the layer's views built once
        return _lora_ops.forward_fast(frozen, *args[:6])
    # the op's kernel itself, without the autograd.Function (ops/_direct.py)
    return (_lora_ops._forward_native if _direct.ok(x) else torch.ops.lowrank.lora_linear_forward)(*args)[0]


def check_rank_fits(r: int, in_features: int, out_features: int) -> None:
    """A LoRA rank no larger than the layer allows: ``s·B A`` has rank at most ``min(in, out)``, so a
    larger ``r`` only adds parameters (and a 0-feature layer has no room for an adapter at all)."""
    limit = min(in_features, out_features)
    if r > limit:
        raise ValueError(
            f"r: expected at most min(in_features, out_features) = {limit} for a {in_features} -> {out_features} "
            f"layer (a larger rank adds parameters, not rank), got {r}"
        )


def check_linear_args(in_features, out_features, dtype) -> None:
    """``nn.Linear``'s constructor arguments, checked before ``nn.Linear`` fails with a message naming none."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")


class LoRAFactor(nn.Module):
    """Holds one adapter factor as ``.weight`` so keys read ``lora_A.weight`` as in PEFT files.

    Not an ``nn.Linear``: code that swaps every ``nn.Linear`` of a model must not recurse into it.
    """

    def __init__(self, rows: int, cols: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class LoRAAdapter:
    """The LoRA adapter of a layer (``LoRALinear``, ``QLoRALinear``): options, PEFT's init and key
    names, the dense update it stands for, and loading a base-only checkpoint. The layer sets
    ``in_features``/``out_features`` and calls :meth:`_init_adapter`."""

    def _init_adapter(self, r, alpha, dropout, use_rslora, device, dtype) -> None:
        """Validates the LoRA options and creates ``lora_A``/``lora_B``/``lora_dropout`` on ``self``
        (which has ``in_features``/``out_features``), then registers the base-only load hook."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        check_rank_fits(r, self.in_features, self.out_features)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise TypeError(f"alpha: expected a number, got {type(alpha).__name__}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
        check_probability("dropout", dropout)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"adapter_dtype: expected a floating-point dtype, got {dtype}")
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = LoRAFactor(r, self.in_features, device=device, dtype=dtype)
        self.lora_B = LoRAFactor(self.out_features, r, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        self.register_load_state_dict_post_hook(LoRAAdapter._allow_base_only_state_dict)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a=√5, as nn.Linear), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @staticmethod
    def _allow_base_only_state_dict(module, incompatible_keys) -> None:
        # An nn.Linear checkpoint has no adapter: keep the fresh (identity) adapter instead of failing.
        missing = incompatible_keys.missing_keys
        prefix_keys = [k for k in missing if k.endswith(("lora_A.weight", "lora_B.weight"))]
        by_prefix = {}
        for k in prefix_keys:
            by_prefix.setdefault(k.rsplit("lora_", 1)[0], []).append(k)
        for keys in by_prefix.values():
            if len(keys) == 2:
                for k in keys:
                    missing.remove(k)

    def delta_weight(self) -> Tensor:
        """``s·B A`` in fp32 (the dense update this adapter stands for)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


class LoRALinear(LoRAAdapter, nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, computed by fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r: adapter rank (>= 1).
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the adapter's input (the base path never sees dropout).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
        adapter_dtype: dtype of ``lora_A``/``lora_B`` (default: the base dtype). ``torch.float32``
            with a bf16 base keeps the trainable factors and their optimizer updates in fp32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        check_linear_args(in_features, out_features, dtype)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base.weight, base.bias, r, alpha, dropout, use_rslora, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` parameters are shared, not copied,
        and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(linear.weight, linear.bias, r, alpha, dropout, use_rslora, adapter_dtype)
        return self

    def _init_from(self, weight, bias, r, alpha, dropout, use_rslora, adapter_dtype) -> None:
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight: expected a floating-point base weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(r, alpha, dropout, use_rslora, weight.device, adapter_dtype or weight.dtype)
        self.merged = False
        self._frozen = _lora_ops.FrozenOperands()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (``W += s·B A``); forward then is one plain GEMM."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W -= s·B A``), exact up to one rounding of W's dtype."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if self.merged:  # the base alone, as a frozen head: the row kernel when decoding (ops/lora.py)
            return _lora_ops.frozen_linear(x, param(self, "weight"), param(self, "bias"))
        adapter_input = None
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            adapter_input = self.lora_dropout(x)
        lora_a, lora_b = param(submodule(self, "lora_A"), "weight"), param(submodule(self, "lora_B"), "weight")
        args = (x, param(self, "weight"), param(self, "bias"), lora_a, lora_b, self.scaling, adapter_input)
        return lora_call(args, self._frozen)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, rslora={self.use_rslora}, "
            f"merged={self.merged}"
        )
