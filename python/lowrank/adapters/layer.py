"""A layer of an adapted model: one frozen base plus named adapters, one of them active.

``AdaptedLinear`` wraps the base (an ``nn.Linear``, a GPT-2 ``Conv1D``, or a 4-bit ``NF4Linear``)
and holds each adapter under its name in ``adapters``. Each method is one small module that says
three things — how its term enters the fused kernels (``forward``), what dense update it stands for
(``delta_weight``), and what its file keys are (``file_tensors`` / ``load_file_tensors``):

- ``LoRA``:  ``y = x Wᵀ + b + s·B(A x)``; over an ``nn.Linear`` (or a GPT-2 ``Conv1D``, its weight re-laid in
  memory as ``W``'s rows: ``rows_layout``) the fused LoRA kernels, over NF4 the fused dequant kernels with
  the adapter in the same pass, over anything else ``base(x)`` + the term.
- ``VeRA``:  ``y = x Wᵀ + b + Λ_b B_s Λ_d A_s x`` with ``A, B`` shared by every layer of the adapter.
- ``FullDelta``: full fine-tuning. It holds the fine-tuned weight ``W0 + ΔW`` as one trainable tensor
  (so the forward is one plain GEMM, exactly plain PyTorch's step) while the base keeps ``W0`` frozen;
  ``ΔW = weight - W0`` is what it saves and merges.

``ModulesToSave`` keeps a trainable copy of a whole module per adapter (PEFT's ``modules_to_save``).

Switching adapters changes which name a layer reads: it never touches the base's memory.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.lora import LoRAAdapter, lora_call
from ..layers.nf4 import NF4Linear
from ..layers.vera import SharedProjections, _has_dense_weight, vera_call
from ..ops import _gemm
from ..ops._direct import param, submodule
from ..ops import lora as _lora_ops
from ..layers.frozen import FrozenLinear
from ..ops.lora import fold_rows, frozen_linear

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
BASE_ONLY = "__base__"


def fold_rows_pre_hook(module: nn.Module, args: tuple):
    """Forward pre-hook of a frozen ``nn.Linear`` subclass that lowrank leaves as it is (an output head
    of a class of its own, whose forward is ``nn.Linear``'s; a plain one becomes a :class:`FrozenLinear`):
    its input through :func:`fold_rows`."""
    if args and type(args[0]) is Tensor:
        x = fold_rows(args[0])
        if x is not args[0]:
            return (x, *args[1:])
    return None


def check_adapter_name(name) -> str:
    """Adapter names are module names: letters, digits, ``_`` and ``-``, not starting with a digit."""
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE_ONLY:
        raise ValueError(
            f"adapter_name: expected a name of letters, digits, '_' or '-' (not starting with a digit, "
            f"not {BASE_ONLY!r}), got {name!r}"
        )
    return name


def is_conv1d(module: nn.Module) -> bool:
    """HF transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W:[in, out]`` (fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def base_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` (a plain ``nn.Linear``: fused kernels), ``"nf4"``, ``"conv1d"``, or ``None`` (not a
    layer lowrank adapts)."""
    if type(module) is NF4Linear:
        return "nf4"
    if _has_dense_weight(module):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    return None


def base_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_base_weight(base: nn.Module) -> Tensor:
    """The base weight as ``[out, in]`` (a view for Conv1D). Raises for a 4-bit base."""
    if isinstance(base, NF4Linear):
        raise TypeError(f"{type(base).__name__}: a 4-bit base has no dense weight")
    return base.weight.t() if is_conv1d(base) else base.weight


@torch.no_grad()
def rows_layout(conv: nn.Module) -> None:
    """A GPT-2 ``Conv1D``'s weight (``[in, out]``, ``x W + b``) re-laid in memory as ``W``'s ``[out, in]``
    rows, in place: the parameter keeps its shape, values and identity (``.data`` swapped; strides
    ``(1, in)``), so ``Conv1D.forward``'s ``addmm`` and its state dict read the same numbers, while
    ``dense_base_weight`` becomes a contiguous ``[out, in]`` view the fused kernels take as they take an
    ``nn.Linear``'s. No memory is added beyond the one layer's copy while it is made. (A state dict
    written with ``safetensors.torch.save_file`` directly then needs ``.contiguous()``, as safetensors says;
    transformers' ``save_pretrained`` does that itself, and ``merge_and_unload`` restores the layout.)
    GPT-2 small, 8 rows decoding, fp32 (Zen 4): 92.6 → 58.1 ms per token with LoRA, PEFT 93.7."""
    w = conv.weight
    if w.dim() == 2 and not w.t().is_contiguous():
        w.data = w.detach().t().contiguous().t()


@torch.no_grad()
def plain_layout(conv: nn.Module) -> None:
    """Undoes :func:`rows_layout`: the ``Conv1D`` weight contiguous in its own ``[in, out]`` shape again."""
    w = conv.weight
    if not w.is_contiguous():
        w.data = w.detach().contiguous()


def dense_rows(layer: "AdaptedLinear") -> Optional[Tensor]:
    """:func:`dense_base_weight` where the fused kernels take it, on the per-call path (``param`` and
    ``submodule``: no ``Module.__getattr__``): an ``nn.Linear``'s weight, or a ``Conv1D``'s ``[out, in]``
    view once :func:`rows_layout` made it rows; None for an NF4 base (its own kernels) and a ``Conv1D``
    whose view is not rows."""
    base = submodule(layer, "base_layer")
    if layer.kind == "linear":
        return param(base, "weight")
    if layer.kind == "conv1d":
        w = param(base, "weight").t()
        return w if w.is_contiguous() else None
    return None


def _adapter_input(dropout: nn.Module, x: Tensor, training: bool) -> Optional[Tensor]:
    return dropout(x) if isinstance(dropout, nn.Dropout) and training else None


class LoRA(LoRAAdapter, nn.Module):
    """A LoRA adapter of one layer: ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r] (PEFT's names,
    init and scaling)."""

    method = "lora"

    def __init__(self, in_features, out_features, *, r, alpha, dropout, use_rslora, device, dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_adapter(r, alpha, dropout, use_rslora, device, dtype)
        self._frozen = _lora_ops.FrozenOperands()  # the base it adapts stays the same tensors between calls

    def forward(self, layer: "AdaptedLinear", x: Tensor) -> Tensor:
        base = submodule(layer, "base_layer")
        a, b = param(submodule(self, "lora_A"), "weight"), param(submodule(self, "lora_B"), "weight")
        adapter_input = _adapter_input(submodule(self, "lora_dropout"), x, self.training) if self.training else None
        if layer.kind == "nf4":
            return base._forward(x, a, b, self.scaling, adapter_input)
        weight = dense_rows(layer)
        if weight is not None:  # nn.Linear, or Conv1D re-laid as rows: the fused kernels
            return lora_call((x, weight, param(base, "bias"), a, b, self.scaling, adapter_input), self._frozen)
        y = base(x)
        xa = x if adapter_input is None else adapter_input
        return y + (F.linear(F.linear(xa.to(a.dtype), a), b) * self.scaling).to(y.dtype)

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


class VeRA(SharedProjections, nn.Module):
    """A VeRA adapter of one layer: trainable ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] over the
    adapter's shared frozen pair ``vera_A`` [r, max_in], ``vera_B`` [max_out, r] (buffers every layer of
    the adapter holds by reference; the slices this layer uses are views)."""

    method = "vera"

    def __init__(self, in_features, out_features, *, r, d_initial, dropout, projections, device, dtype):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.d_initial = float(d_initial)
        vera_a, vera_b = projections
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), self.d_initial, device=device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, layer: "AdaptedLinear", x: Tensor) -> Tensor:
        adapter_input = _adapter_input(self.vera_dropout, x, self.training)
        vera_a, vera_b = self.projection_slices()
        rows = dense_rows(layer)
        fused = rows is not None
        base = layer.base_layer
        y_base = None if fused else base(x)  # a base with no dense W adds its own x Wᵀ; the op adds the term
        weight, bias = (rows, base.bias) if fused else (None, None)
        y = vera_call((x, weight, bias, vera_a, vera_b, self.vera_lambda_d, self.vera_lambda_b, adapter_input))
        return y if fused else y_base + y

    def file_tensors(self) -> dict[str, Tensor]:
        return {"vera_lambda_d": self.vera_lambda_d, "vera_lambda_b": self.vera_lambda_b}

    def extra_repr(self) -> str:
        return f"r={self.r}, in_features={self.in_features}, out_features={self.out_features}"


class FullDelta(nn.Module):
    """Full fine-tuning of one layer: ``weight`` (and ``bias``) hold ``W0 + ΔW``, trainable, in the base's
    own layout, while the base keeps ``W0`` frozen. The forward is the base's own product with these
    tensors (one GEMM, as plain full fine-tuning); ``ΔW = weight - W0`` is what is saved and merged."""

    method = "full"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.conv1d = is_conv1d(base)
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone()) if getattr(base, "bias", None) is not None else None

    def forward(self, layer: "AdaptedLinear", x: Tensor) -> Tensor:
        if not self.conv1d:
            return _gemm.dense_linear(x, self.weight, self.bias)
        shape = x.shape[:-1] + (self.weight.shape[1],)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else x2 @ self.weight
        return y.view(shape)

    def delta_weight_native(self, base: nn.Module) -> Tensor:
        """``ΔW`` in fp32, in the base's layout (``[in, out]`` for a Conv1D)."""
        return self.weight.detach().float() - base.weight.detach().float()

    def file_tensors_for(self, base: nn.Module) -> dict[str, Tensor]:
        out = {"full_delta.weight": (self.weight.detach().float() - base.weight.detach().float()).to(self.weight.dtype)}
        if self.bias is not None:
            out["full_delta.bias"] = (self.bias.detach().float() - base.bias.detach().float()).to(self.bias.dtype)
        return out

    def extra_repr(self) -> str:
        return f"weight={list(self.weight.shape)}, bias={self.bias is not None}"


class AdaptedLinear(nn.Module):
    """A frozen base layer plus named adapters (``adapters``), the active one computing the output.

    ``base_layer`` keeps the original module (``nn.Linear``, ``Conv1D`` or ``NF4Linear``), frozen;
    ``weight`` and ``bias`` read through to it, so code that inspects ``layer.weight`` still works.
    """

    _mixed = None  # a MixedBatch while ``lowrank.mixed_batch`` is active (adapters/mixed.py)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(
                f"base_layer: expected an nn.Linear, a transformers Conv1D or an NF4Linear, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer.requires_grad_(False)
        self.kind = kind
        if kind == "conv1d":
            rows_layout(base_layer)
        self.in_features, self.out_features = base_features(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False
        self.merged_adapters: list[str] = []
        self._merge_undo: dict[str, object] = {}

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if self._mixed is not None:
            return self._mixed.linear_forward(self, x)
        name = self.active_adapter
        if name is None or self.adapters_disabled or name in self.merged_adapters:
            return self.base_forward(x)
        return submodule(self, "adapters")[name](self, x)  # (_modules, not Module.__getattr__: ~0.4 µs a lookup)

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer alone (no adapter, or merged ones): a dense base (``nn.Linear``, or a ``Conv1D``
        over its ``[out, in]`` rows: :func:`dense_rows`) through :func:`frozen_linear`, as a frozen head;
        an NF4 base as it is."""
        base = self.base_layer
        w = dense_rows(self)
        return base(x) if w is None else frozen_linear(x, w, base.bias)

    # ---- the dense update an adapter stands for, in [out, in] fp32 --------------------------------
    def delta_weight(self, name: str) -> Tensor:
        adapter = self.adapters[name]
        if adapter.method == "full":
            delta = adapter.delta_weight_native(self.base_layer)
            return delta.t() if self.kind == "conv1d" else delta
        return adapter.delta_weight()

    # ---- merge / unmerge ------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> Optional[dict]:
        """Fold adapter ``name`` into the base. Returns the error report for a (lossy) 4-bit base."""
        if name in self.merged_adapters:
            raise RuntimeError(f"merge: adapter {name!r} is already merged")
        adapter = self.adapters[name]
        report = None
        if self.kind == "nf4":
            report, self._merge_undo[name] = self.base_layer.add_delta_lossy(
                self.delta_weight(name), what=f"merge of adapter {name!r}"
            )
        elif adapter.method == "full":
            base = self.base_layer
            self._merge_undo[name] = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
            base.weight.copy_(adapter.weight)
            if adapter.bias is not None:
                base.bias.copy_(adapter.bias)
        else:
            w = dense_base_weight(self.base_layer)
            w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged_adapters.append(name)
        return report

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise RuntimeError(f"unmerge: adapter {name!r} is not merged")
        adapter = self.adapters[name]
        if self.kind == "nf4":
            self.base_layer.restore_quant_state(self._merge_undo.pop(name))
        elif adapter.method == "full":
            weight, bias = self._merge_undo.pop(name)
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        else:
            w = dense_base_weight(self.base_layer)
            w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base={self.kind}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter!r}, merged={self.merged_adapters}"
        )


class ModulesToSave(nn.Module):
    """A module kept whole and trainable per adapter (PEFT's ``modules_to_save``): ``original_module`` is
    frozen, ``copies[name]`` is the adapter's own trainable copy, and the active one runs."""

    _mixed = None  # as AdaptedLinear._mixed

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.copies = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False

    def add(self, name: str) -> nn.Module:
        import copy

        clone = copy.deepcopy(self.original_module).requires_grad_(True)
        if type(clone) is FrozenLinear:  # a trainable copy of a head inject froze: a plain nn.Linear again
            clone.__class__ = nn.Linear
        self.copies[name] = clone
        return clone

    def forward(self, *args, **kwargs):
        if self._mixed is not None and args:
            return self._mixed.saved_forward(self, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.adapters_disabled or name not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[name](*args, **kwargs)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            # attributes of the wrapped module (e.g. an embedding's ``weight`` for tying checks)
            modules = self.__dict__.get("_modules", {})
            original = modules.get("original_module")
            if original is None:
                raise
            name = None if self.__dict__.get("adapters_disabled") else self.__dict__.get("active_adapter")
            copies = modules.get("copies")
            target = copies[name] if name is not None and copies is not None and name in copies else original
            return getattr(target, item)
