"""``VeRALinear``: a drop-in ``nn.Linear`` with a VeRA adapter, ``y = x Wᵀ + bias + b ⊙ (B_s (d ⊙ (A_s x)))``.

Follows PEFT's definition so adapters interoperate: one frozen random pair ``A:[r, max_in]``,
``B:[max_out, r]`` per adapter, shared by every adapted layer (each takes the top-left slices
``A_s = A[:r, :in]``, ``B_s = B[:out, :r]``, as views), drawn Kaiming-uniform from a CPU
``torch.Generator`` seeded with ``projection_prng_key`` (A first, then B) — bit for bit what PEFT draws;
trainable vectors ``d = vera_lambda_d`` [r] (starts at ``d_initial``) and ``b = vera_lambda_b`` [out]
(starts at zeros, so a fresh adapter is the identity). The projections are buffers (no gradients, no
optimizer state), kept in the state dict with ``save_projection=True`` (PEFT's default) and otherwise
regenerated from the key when the layer is built.

The base is a frozen ``nn.Linear`` (fused kernels: W streamed once for few tokens, the adapter
accumulated into the base GEMM for many) or any module with ``in_features``/``out_features`` whose
forward computes the frozen base product, e.g. a 4-bit ``NF4Linear`` (then ``base_layer(x)`` plus the
adapter term from the same ops).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import _autocast
from ..autograd import VeRALinearFunction
from ..ops import _direct, _runtime
from ..ops import lora as _lora_ops
from ..ops import vera as _vera_ops
from .frozen import LINEAR_FORWARDS
from .lora import check_linear_args, check_probability

_PROJECTION_NAMES = ("vera_A", "vera_B")
_VECTOR_NAMES = ("vera_lambda_d", "vera_lambda_b")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's ``vera.model._kaiming_init``: U(-bound, bound), bound = √3 · √2 / √fan_in, fp32 on the CPU.
    The float expressions are PEFT's, in its order, so the bound (and so every value) is the same."""
    tensor = torch.empty(shape)
    fan = shape[1]  # torch.nn.init._calculate_correct_fan(tensor, "fan_in") for a 2-D tensor
    gain = math.sqrt(2)
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def vera_shared_projections(
    r: int,
    max_in_features: int,
    max_out_features: int,
    projection_prng_key: int = 0,
    *,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> tuple[Tensor, Tensor]:
    """The frozen pair ``(A:[r, max_in_features], B:[max_out_features, r])`` that every VeRA layer of one
    adapter shares, drawn exactly as PEFT draws them (same key -> same bits, in any process).

    Pass it to each layer as ``VeRALinear(..., projections=(A, B))``; layers of different sizes use
    the top-left slices they need.
    """
    for name, value in (("r", r), ("max_in_features", max_in_features), ("max_out_features", max_out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not isinstance(projection_prng_key, int) or isinstance(projection_prng_key, bool):
        raise TypeError(f"projection_prng_key: expected an int, got {type(projection_prng_key).__name__}")
    generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
    vera_a = _kaiming_uniform((r, max_in_features), generator)
    vera_b = _kaiming_uniform((max_out_features, r), generator)
    return vera_a.to(device=device, dtype=dtype), vera_b.to(device=device, dtype=dtype)


# Module.to()/.cuda()/.half() convert every layer's buffers separately, which would give each layer
# its own copy of the shared pair. A layer records (conversion fn, result) per original tensor here;
# the next layer converting the same tensor with the same fn (one .to() call) takes that result.
# Keyed by identity (a tensor's == is elementwise), held weakly: an entry goes with its original tensor.
_CONVERTED = WeakIdKeyDictionary()


def _has_dense_weight(base: nn.Module) -> bool:
    """True for an nn.Linear (or subclass) that computes a plain ``F.linear`` with a float weight."""
    return (
        isinstance(base, nn.Linear)
        and type(base).forward in LINEAR_FORWARDS
        and isinstance(base.weight, Tensor)
        and base.weight.dtype.is_floating_point
    )


def vera_call(args: tuple) -> Tensor:
    """A VeRA layer's output (or, with ``weight=None``, its term) for ``args`` = ``(x, weight, bias, vera_a,
    vera_b, lambda_d, lambda_b, adapter_input)``: the autograd Function where a gradient may be wanted,
    else the op's kernel itself. Under ``torch.autocast`` x, W, the bias, the adapter input and the frozen
    projections are cast to autocast's dtype, as ``F.linear`` casts its operands (PEFT's VeRA is two of
    them), the trainable scalings kept as the kernels take them, and the kernels run with autocast off
    (lowrank/_autocast.py); decoding over an fp32 W reads W as it is
    (``ops.lora.fp32_rows_under_autocast``)."""
    x = args[0]
    dtype = _autocast.dtype_for(x)
    if dtype is not None:
        x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input = args
        few_rows = weight is not None and _lora_ops.fp32_rows_under_autocast(x, weight, _runtime.cpu_fused_max_m)
        if few_rows and adapter_input is None:
            # decoding: the fused rows over the fp32 W as it is, x and the output rounded as autocast rounds them
            fp32 = tuple(_autocast.cast(t, torch.float32) for t in (bias, vera_a, vera_b, lambda_d, lambda_b))
            with _autocast.off(x):
                return vera_call((x.to(dtype).float(), weight, *fp32, None)).to(dtype)
        x, bias, adapter_input = (_autocast.cast(t, dtype) for t in (x, bias, adapter_input))
        weight, vera_a, vera_b = (_autocast.cast_frozen(t, dtype) for t in (weight, vera_a, vera_b))
        (lambda_d,), (lambda_b,) = _autocast.cast_adapter(dtype, lambda_d), _autocast.cast_adapter(dtype, lambda_b)
        args = (x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
        with _autocast.off(x):
            return vera_call(args)
    if torch.is_grad_enabled():
        return _direct.apply(VeRALinearFunction, *args)[0]
    # inference: the op itself, without the autograd.Function's Python overhead
    return (_vera_ops._forward_native if _direct.ok(x) else torch.ops.lowrank.vera_linear_forward)(*args)[0]


class SharedProjections:
    """A VeRA adapter's view of its shared pair (``vera_A``/``vera_B`` buffers, ``vera_lambda_d``/``_b``,
    ``r``, ``in_features``, ``out_features`` on the module): the slices it uses, the dense update it
    stands for, and one pair kept across every module holding it when the model is converted
    (``.to()``, ``.cuda()``, ``.half()``; see ``_CONVERTED``)."""

    def projection_slices(self) -> tuple[Tensor, Tensor]:
        """``(A[:r, :in], B[:out, :r])``: views of the shared projections."""
        return self.vera_A[: self.r, : self.in_features], self.vera_B[: self.out_features, : self.r]

    def delta_weight(self) -> Tensor:
        """``(b ⊙ B_s)(d ⊙ A_s)`` in fp32 (the dense update this adapter stands for)."""
        vera_a, vera_b = self.projection_slices()
        d, b = self.vera_lambda_d.float(), self.vera_lambda_b.float()
        return (b[:, None] * vera_b.float()) @ (d[:, None] * vera_a.float())

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in _PROJECTION_NAMES}
        result = super()._apply(fn, recurse)
        for name, original in before.items():
            cached = _CONVERTED.get(original)
            if cached is not None and cached[0] is fn:
                self._buffers[name] = cached[1]  # another layer already converted the shared tensor
            elif self._buffers[name] is not original:
                _CONVERTED[original] = (fn, self._buffers[name])
        return result


class VeRALinear(SharedProjections, nn.Module):
    """A frozen base linear layer plus a VeRA adapter, computed by fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r: adapter rank (>= 1; PEFT's default 256).
        d_initial: initial value of every entry of ``d`` (``vera_lambda_d``); ``b`` starts at zeros.
        dropout: dropout probability on the adapter's input (the base path never sees dropout).
        projections: the shared ``(A, B)`` pair (``vera_shared_projections``), ``A:[>= r, >= in]``,
            ``B:[>= out, >= r]``; held by reference, not copied. Default: a pair of exactly this layer's
            size, drawn from ``projection_prng_key``.
        projection_prng_key: seed of the projections (PEFT's ``projection_prng_key``, default 0).
        save_projection: keep ``vera_A``/``vera_B`` in the state dict (PEFT's default); with False they
            are regenerated from the key when a layer is built.
        adapter_dtype: dtype of ``d``, ``b`` and the generated projections (default: the base dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int = 256,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        projections: Optional[tuple[Tensor, Tensor]] = None,
        projection_prng_key: int = 0,
        save_projection: bool = True,
        adapter_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        check_linear_args(in_features, out_features, dtype)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(
            base, r, d_initial, dropout, projections, projection_prng_key, save_projection, adapter_dtype
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        r: int = 256,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        projections: Optional[tuple[Tensor, Tensor]] = None,
        projection_prng_key: int = 0,
        save_projection: bool = True,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "VeRALinear":
        """Wrap an existing base layer, frozen. An ``nn.Linear``'s ``weight``/``bias`` are shared (not
        copied) and take the fused kernels; any other module with ``in_features``/``out_features``
        (e.g. ``NF4Linear``) is kept as ``base_layer`` and called as is, the adapter term added to its
        output."""
        if not isinstance(linear, nn.Module):
            raise TypeError(f"linear: expected an nn.Module, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(
            linear, r, d_initial, dropout, projections, projection_prng_key, save_projection, adapter_dtype
        )
        return self

    def _init_from(self, base, r, d_initial, dropout, projections, projection_prng_key, save_projection, adapter_dtype):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool):
            raise TypeError(f"d_initial: expected a number, got {type(d_initial).__name__}")
        check_probability("dropout", dropout)
        if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype: expected a floating-point dtype, got {adapter_dtype}")
        in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(
                    f"linear: expected a module with an int {name} (nn.Linear, NF4Linear, ...), "
                    f"{type(base).__name__} has {name}={value!r}"
                )
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.d_initial = float(d_initial)
        self.projection_prng_key = projection_prng_key
        self.save_projection = bool(save_projection)
        if _has_dense_weight(base):
            if tuple(base.weight.shape) != (out_features, in_features):
                raise ValueError(
                    f"linear: weight has shape {list(base.weight.shape)}, expected [{out_features}, {in_features}]"
                )
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.bias = base.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.base_layer = None
            device, base_dtype = base.weight.device, base.weight.dtype
        else:
            self.weight = self.bias = None
            self.base_layer = base.requires_grad_(False)
            tensors = list(base.parameters()) + list(base.buffers())
            device = tensors[0].device if tensors else torch.device("cpu")
            floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
            base_dtype = floats[0] if floats else torch.float32
        dtype = adapter_dtype or base_dtype

        if projections is None:
            vera_a, vera_b = vera_shared_projections(
                r, in_features, out_features, projection_prng_key, dtype=dtype, device=device
            )
        else:
            vera_a, vera_b = self._check_projections(projections, device)
        self.register_buffer("vera_A", vera_a, persistent=self.save_projection)
        self.register_buffer("vera_B", vera_b, persistent=self.save_projection)
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_vera_parameters()
        self.register_load_state_dict_post_hook(VeRALinear._allow_base_only_state_dict)

    def _check_projections(self, projections, device) -> tuple[Tensor, Tensor]:
        if not isinstance(projections, (tuple, list)) or len(projections) != 2:
            raise TypeError("projections: expected a pair (A, B) of tensors (see lowrank.vera_shared_projections)")
        vera_a, vera_b = projections
        for name, t in (("projections[0] (A)", vera_a), ("projections[1] (B)", vera_b)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
                raise TypeError(f"{name}: expected a 2-D floating-point tensor, got {t!r:.80}")
            if t.device != torch.device(device):
                raise ValueError(f"{name}: expected a tensor on {device} (the base layer's device), got {t.device}")
        if vera_a.shape[0] < self.r or vera_a.shape[1] < self.in_features:
            raise ValueError(
                f"projections[0] (A): expected at least [r={self.r}, in_features={self.in_features}], "
                f"got {list(vera_a.shape)}"
            )
        if vera_b.shape[0] < self.out_features or vera_b.shape[1] < self.r:
            raise ValueError(
                f"projections[1] (B): expected at least [out_features={self.out_features}, r={self.r}], "
                f"got {list(vera_b.shape)}"
            )
        if vera_a.dtype != vera_b.dtype:
            raise TypeError(f"projections: A and B must share one dtype, got {vera_a.dtype} and {vera_b.dtype}")
        # The same tensor objects, so every layer holds one pair (and .to() keeps it one, see _apply).
        return tuple(t.detach() if t.requires_grad else t for t in (vera_a, vera_b))

    def reset_vera_parameters(self) -> None:
        """PEFT's init: ``d`` filled with ``d_initial``, ``b`` zeros (a fresh adapter is the identity)."""
        with torch.no_grad():
            self.vera_lambda_d.fill_(self.d_initial)
            self.vera_lambda_b.zero_()

    @staticmethod
    def _allow_base_only_state_dict(module, incompatible_keys) -> None:
        # A base-only checkpoint (nn.Linear's weight/bias) has no adapter: keep the fresh (identity)
        # adapter and the projections drawn from the key instead of failing.
        missing = incompatible_keys.missing_keys
        for names in (_VECTOR_NAMES, _PROJECTION_NAMES):
            by_prefix: dict[str, list[str]] = {}
            for key in missing:
                for name in names:
                    if key.endswith(name) and (key == name or key.endswith("." + name)):
                        by_prefix.setdefault(key[: -len(name)], []).append(key)
            for keys in by_prefix.values():
                if len(keys) == len(names):
                    for key in keys:
                        missing.remove(key)

    # ------------------------------------------------------------------------------------------
    def _dense_weight_or_raise(self, what: str) -> Tensor:
        if self.weight is None:
            raise TypeError(
                f"{what}: the base layer ({type(self.base_layer).__name__}) has no dense weight to fold the "
                "adapter into; keep the adapter unmerged (its forward adds the adapter term to the base output)"
            )
        return self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (``W += (b ⊙ B_s)(d ⊙ A_s)``): forward then is one GEMM."""
        weight = self._dense_weight_or_raise("merge")
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, exact up to one rounding of W's dtype."""
        weight = self._dense_weight_or_raise("unmerge")
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if self.merged:  # the base alone, as a frozen head: the row kernel when decoding (ops/lora.py)
            return _lora_ops.frozen_linear(x, self.weight, self.bias)
        adapter_input = None
        if isinstance(self.vera_dropout, nn.Dropout) and self.training:
            adapter_input = self.vera_dropout(x)
        vera_a, vera_b = self.projection_slices()
        base_out = None
        if self.weight is None:
            base_out = self.base_layer(x)
        args = (x, self.weight, self.bias, vera_a, vera_b, self.vera_lambda_d, self.vera_lambda_b, adapter_input)
        y = vera_call(args)
        return y if base_out is None else base_out + y

    def extra_repr(self) -> str:
        base = "" if self.base_layer is None else f", base_layer={type(self.base_layer).__name__}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None if self.base_layer is None else 'base'}, r={self.r}, "
            f"d_initial={self.d_initial:g}, projection_prng_key={self.projection_prng_key}, "
            f"save_projection={self.save_projection}, merged={self.merged}{base}"
        )
