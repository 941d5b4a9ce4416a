"""The adapter pattern on a whole model: inject, name, switch, disable, merge, unload, summarize.

Small functions over any ``nn.Module`` (plain PyTorch or HF transformers). :func:`inject` walks the
model once and replaces each targeted layer in place by an :class:`AdaptedLinear` (its base kept,
frozen) that holds the adapter under its name; further ``inject`` / ``load_adapter`` calls add more
adapters to the same layers. Nothing here knows one model class; no state lives outside the layers
(each adapter module carries its config), so a model wrapped by DDP or FSDP still works.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .._hooks import has_forward_pre_hook
from ..layers.lora import check_rank_fits
from ..layers.nf4 import NF4Linear
from ..layers.vera import vera_shared_projections
from .config import AdapterConfig, FullConfig, LoRAConfig, QLoRAConfig, VeRAConfig
from .layer import (
    AdaptedLinear,
    FrozenLinear,
    FullDelta,
    LoRA,
    ModulesToSave,
    VeRA,
    base_features,
    base_kind,
    check_adapter_name,
    fold_rows_pre_hook,
    is_conv1d,
    plain_layout,
)

# ---------------------------------------------------------------------------------------------
# Walking a model
# ---------------------------------------------------------------------------------------------


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(name, module, parent, attribute)`` for every module below ``module``, not descending into
    lowrank's own wrappers (their insides are the adapter, not the model)."""
    for attr, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        yield name, child, module, attr
        if not isinstance(child, (AdaptedLinear, ModulesToSave)):
            yield from _walk(child, name)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """``(name, layer)`` for every :class:`AdaptedLinear` of ``model``."""
    for name, module, _, _ in _walk(model):
        if isinstance(module, AdaptedLinear):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module, _, _ in _walk(model):
        if isinstance(module, ModulesToSave):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head, which ``"all-linear"`` leaves out (as PEFT does)."""
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            head = get()
    names = set()
    for name, module, _, _ in _walk(model):
        inner = module.base_layer if isinstance(module, AdaptedLinear) else module
        if (head is not None and inner is head) or name == "lm_head" or name.endswith(".lm_head"):
            names.add(name)
    return names


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, nn.Module, str]]:
    heads = _output_head_names(model) if config.target_modules == "all-linear" else set()
    found = []
    for name, module, parent, attr in _walk(model):
        adaptable = isinstance(module, AdaptedLinear) or base_kind(module) is not None
        if not adaptable or name in heads:
            continue
        if config.target_modules != "all-linear" and not _matches(name, config.target_modules):
            continue
        if config.exclude_modules == "all-linear" or _matches(name, config.exclude_modules):
            continue
        found.append((name, module, parent, attr))
    if not found:
        linear_names = [n for n, m, _, _ in _walk(model) if base_kind(m) is not None or isinstance(m, AdaptedLinear)]
        hint = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"target_modules: {config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"linear layer of {type(model).__name__}; its linear layers are: {hint or 'none'}"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Building adapters
# ---------------------------------------------------------------------------------------------


def quantize_linear(module: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> NF4Linear:  # fmt: skip
    """An ``NF4Linear`` holding ``module``'s weight in NF4 (an ``nn.Linear`` or a GPT-2 ``Conv1D``; the
    bias is shared). The dense weight is not kept."""
    if isinstance(module, NF4Linear):
        return module
    if is_conv1d(module):
        nx, nf = module.weight.shape
        dense = nn.Linear(nx, nf, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
        dense.bias = module.bias
        module = dense
    if not isinstance(module, nn.Linear):
        raise TypeError(f"module: expected an nn.Linear or a Conv1D to quantize, got {type(module).__name__}")
    return NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype).requires_grad_(False)


def _adapter_dtype(base: nn.Module, config: AdapterConfig) -> torch.dtype:
    explicit = getattr(config, "adapter_dtype", None)
    if explicit is not None:
        return explicit
    if isinstance(base, NF4Linear):
        return base.compute_dtype or base.weight_dtype
    return base.weight.dtype


def _device(base: nn.Module) -> torch.device:
    return base.weight.device


def _make_adapter(base: nn.Module, config: AdapterConfig, projections=None) -> nn.Module:
    in_features, out_features = base_features(base)
    device, dtype = _device(base), _adapter_dtype(base, config)
    if isinstance(config, LoRAConfig):
        adapter = LoRA(in_features, out_features, r=config.r, alpha=config.alpha, dropout=config.dropout,
                       use_rslora=config.use_rslora, device=device, dtype=dtype)  # fmt: skip
    elif isinstance(config, VeRAConfig):
        vera_a, vera_b = projections
        if vera_a.shape[0] < config.r or vera_a.shape[1] < in_features or vera_b.shape[0] < out_features:
            raise ValueError(
                f"VeRA projections A {list(vera_a.shape)}, B {list(vera_b.shape)} are smaller than this layer "
                f"needs (r={config.r}, in={in_features}, out={out_features})"
            )
        adapter = VeRA(in_features, out_features, r=config.r, d_initial=config.d_initial, dropout=config.dropout,
                       projections=(vera_a, vera_b), device=device, dtype=dtype)  # fmt: skip
    elif isinstance(config, FullConfig):
        adapter = FullDelta(base)
    else:
        raise TypeError(f"config: expected a LoRAConfig, QLoRAConfig, VeRAConfig or FullConfig, got {type(config).__name__}")
    adapter.config = config
    return adapter


def _check_method_fits(name: str, base: nn.Module, config: AdapterConfig) -> None:
    if isinstance(config, FullConfig) and isinstance(base, NF4Linear):
        raise ValueError(
            f"{name}: full fine-tuning needs a dense weight, but this layer is stored in 4-bit NF4 "
            "(train a LoRA/QLoRA or VeRA adapter on it instead)"
        )
    if isinstance(config, LoRAConfig):  # QLoRAConfig too
        try:
            check_rank_fits(config.r, *base_features(base))
        except ValueError as e:
            raise ValueError(f"{name}: {e} (leave this layer out with exclude_modules, or lower r)") from None


def _vera_projections(bases: list[nn.Module], config: VeRAConfig, given=None):
    """One shared pair for the adapter: drawn as PEFT draws it (key, ``[r, max_in]`` then
    ``[max_out, r]``), or the pair a file holds."""
    if given is not None:
        vera_a, vera_b = given
    else:
        max_in = max(base_features(b)[0] for b in bases)
        max_out = max(base_features(b)[1] for b in bases)
        vera_a, vera_b = vera_shared_projections(config.r, max_in, max_out, config.projection_prng_key)
    dtype = _adapter_dtype(bases[0], config)
    device = _device(bases[0])
    return vera_a.to(device=device, dtype=dtype), vera_b.to(device=device, dtype=dtype)


def _freeze_base(model: nn.Module) -> None:
    """Every parameter that is not an adapter's (or a ``modules_to_save`` copy's) stops training."""
    keep = set()
    for _, layer in adapted_layers(model):
        keep.update(id(p) for p in layer.adapters.parameters())
    for _, saved in _saved_modules(model):
        keep.update(id(p) for p in saved.copies.parameters())
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    _fold_head_inputs(model)


def _fold_head_inputs(model: nn.Module) -> None:
    """An output head left a plain ``nn.Linear``, now frozen, becomes a :class:`FrozenLinear` (its class
    changed, nothing else): rows for torch's GEMM, the row kernel for a few tokens without gradients.
    torch's matmul would copy a frozen weight once per batch entry for the ``hidden[:, -1:, :]`` that
    transformers' prefill gives the head (see ``fold_rows``). A head of a ``nn.Linear`` subclass whose
    forward is ``nn.Linear``'s keeps its class and gets ``fold_rows`` as a forward pre-hook (once). Only
    the head: the layers inside a decoder get their inputs as rows."""
    for name in _output_head_names(model):
        head = model.get_submodule(name)
        if isinstance(head, ModulesToSave):  # the frozen original runs with adapters disabled
            head = head.original_module
        if not isinstance(head, nn.Linear) or head.weight.requires_grad:
            continue
        if type(head) is nn.Linear:
            head.__class__ = FrozenLinear
        elif getattr(head, "_unfused_class", None) is nn.Linear:  # under fast_loss(model, keep_logits=False)
            head._unfused_class = FrozenLinear
        elif type(head).forward is nn.Linear.forward and not has_forward_pre_hook(head, fold_rows_pre_hook):
            head.register_forward_pre_hook(fold_rows_pre_hook)


def _plain_heads(model: nn.Module) -> None:
    """Every :class:`FrozenLinear` an ``nn.Linear`` again (``merge_and_unload``: no lowrank class stays; a
    head under ``fast_loss(model, keep_logits=False)`` stays under it, an ``nn.Linear`` when undone)."""
    for module in model.modules():
        if type(module) is FrozenLinear:
            module.__class__ = nn.Linear
        elif getattr(module, "_unfused_class", None) is FrozenLinear:
            module._unfused_class = nn.Linear


_ORDER = itertools.count()  # adapters remember when they were added, so names list in that order


def _all_adapter_names(model: nn.Module) -> list[str]:
    order: dict[str, int] = {}
    for _, layer in adapted_layers(model):
        for n, adapter in layer.adapters.items():
            order.setdefault(n, getattr(adapter, "_order", 0))
    for _, saved in _saved_modules(model):
        for n, copy in saved.copies.items():
            order.setdefault(n, getattr(copy, "_order", 0))
    return sorted(order, key=order.__getitem__)


def attach(model: nn.Module, adapter_name: str, config: AdapterConfig,
           layers: list[tuple[str, nn.Module, nn.Module, str]], adapters: list[nn.Module],
           trainable: bool = True) -> None:  # fmt: skip
    """Put prepared ``adapters`` into the targeted ``layers`` (and the config's ``modules_to_save``),
    make ``adapter_name`` active and freeze everything else. Nothing here can fail half-way: callers
    check and build everything first."""
    order = next(_ORDER)
    for (name, module, parent, attr), adapter in zip(layers, adapters):
        adapter._order = order
        if not isinstance(module, AdaptedLinear):
            module = AdaptedLinear(module)
            setattr(parent, attr, module)
        adapter.requires_grad_(trainable)
        module.adapters[adapter_name] = adapter
    for name, module, parent, attr in _modules_to_save_targets(model, config):
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            setattr(parent, attr, module)
        module.add(adapter_name).requires_grad_(trainable)._order = order
    _freeze_base(model)
    set_adapter(model, adapter_name)


def _modules_to_save_targets(model: nn.Module, config: AdapterConfig):
    if not config.modules_to_save:
        return []
    found = [(n, m, p, a) for n, m, p, a in _walk(model) if _matches(n, config.modules_to_save)]
    missing = [s for s in config.modules_to_save if not any(_matches(n, [s]) for n, *_ in found)]
    if missing:
        raise ValueError(f"modules_to_save: {missing} match no module of {type(model).__name__}")
    return found


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Adds adapter ``adapter_name`` of ``config``'s method to every layer ``config.target_modules``
    selects, in place, and returns ``model``.

    The base is frozen (every parameter but the adapters'); the new adapter is trainable and becomes
    the active one. ``QLoRAConfig`` first stores the targeted layers' weights (or, with
    ``quantize_base="all-linear"``, every linear layer's but the output head's) in NF4. Raises
    ``ValueError`` naming what does not fit — no target matched, a name already in use, full
    fine-tuning over a 4-bit layer — and leaves the model unchanged then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected a LoRAConfig, QLoRAConfig, VeRAConfig or FullConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in _all_adapter_names(model):
        raise ValueError(f"adapter_name: the model already has an adapter named {adapter_name!r}")
    layers = _targets(model, config)
    _modules_to_save_targets(model, config)  # checked before anything changes
    if isinstance(config, QLoRAConfig):
        for name, module, _, _ in layers:
            if isinstance(module, AdaptedLinear) and module.kind != "nf4":
                raise ValueError(
                    f"{name}: already holds adapters {list(module.adapters)} over a dense weight; QLoRA stores the "
                    "base in NF4, so inject QLoRA before other adapters (or into a model without them)"
                )
    bases = [m.base_layer if isinstance(m, AdaptedLinear) else m for _, m, _, _ in layers]
    for (name, _, _, _), base in zip(layers, bases):
        _check_method_fits(name, base, config)

    if isinstance(config, QLoRAConfig):
        layers, bases = _quantize_for_qlora(model, config, layers)
    projections = _vera_projections(bases, config) if isinstance(config, VeRAConfig) else None
    adapters = [_make_adapter(base, config, projections) for base in bases]
    attach(model, adapter_name, config, layers, adapters)
    return model


def _quantize_for_qlora(model, config: QLoRAConfig, layers):
    """Replaces the targets' (and with ``quantize_base="all-linear"`` every linear layer's) dense
    weights by NF4 in place; returns the targets refreshed."""
    def quantize(module):
        return quantize_linear(module, config.blocksize, config.double_quant, config.compute_dtype)

    target_names = {name for name, *_ in layers}
    heads = _output_head_names(model)
    if config.quantize_base == "all-linear":
        for name, module, parent, attr in list(_walk(model)):
            if name in target_names or name in heads or base_kind(module) not in ("linear", "conv1d"):
                continue
            setattr(parent, attr, quantize(module).requires_grad_(False))
    refreshed, bases = [], []
    for name, module, parent, attr in layers:
        if isinstance(module, AdaptedLinear):
            base = module.base_layer
        else:
            base = quantize(module)
            setattr(parent, attr, base)
            module = base
        refreshed.append((name, module, parent, attr))
        bases.append(base)
    return refreshed, bases


def quantize_model(model: nn.Module, target_modules="all-linear", exclude_modules=None, *, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:  # fmt: skip
    """Stores the selected linear layers' weights in NF4 (``NF4Linear``), in place — the base of a
    QLoRA model before ``load_adapter``. Returns ``model``."""
    config = QLoRAConfig(target_modules=target_modules, exclude_modules=exclude_modules, blocksize=blocksize,
                         double_quant=double_quant, compute_dtype=compute_dtype)  # fmt: skip
    for name, module, parent, attr in _targets(model, config):
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"{name}: already holds adapters; quantize the model before adding adapters")
        setattr(parent, attr, quantize_linear(module, blocksize, double_quant, compute_dtype))
    return model


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def _require(model: nn.Module, adapter_name: str) -> None:
    known = _all_adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"adapter_name: no adapter named {adapter_name!r} in the model (it has {known})")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active adapter of every layer; layers without it run their base.
    Costs a pointer per layer (one walk of the module tree): no weight is copied."""
    layers = [m for _, m, _, _ in _walk(model) if isinstance(m, (AdaptedLinear, ModulesToSave))]
    held = [adapter_name in (m.adapters if isinstance(m, AdaptedLinear) else m.copies) for m in layers]
    if not any(held):
        _require(model, adapter_name)  # raises, naming the adapters there are
    for module, has in zip(layers, held):
        module.active_adapter = adapter_name if has else None


def active_adapter(model: nn.Module) -> Optional[str]:
    """The active adapter's name (``None`` when there is none)."""
    for _, layer in adapted_layers(model):
        if layer.active_adapter is not None:
            return layer.active_adapter
    for _, saved in _saved_modules(model):
        if saved.active_adapter is not None:
            return saved.active_adapter
    return None


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter the model holds, in the order they were added."""
    return _all_adapter_names(model)


def adapter_config(model: nn.Module, adapter_name: Optional[str] = None) -> AdapterConfig:
    """The config adapter ``adapter_name`` (default: the active one) was made with."""
    name = _name_or_active(model, adapter_name)
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return layer.adapters[name].config
    raise ValueError(f"adapter_name: no layer holds adapter {name!r}")


def _name_or_active(model: nn.Module, adapter_name: Optional[str]) -> str:
    if adapter_name is None:
        adapter_name = active_adapter(model)
        if adapter_name is None:
            raise ValueError("adapter_name: the model has no active adapter; name one")
    _require(model, adapter_name)
    return adapter_name


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer (unmerging it first if merged). A layer left with
    no adapter goes back to its base module."""
    _require(model, adapter_name)
    for name, module, parent, attr in list(_walk(model)):
        if isinstance(module, AdaptedLinear) and adapter_name in module.adapters:
            if adapter_name in module.merged_adapters:
                module.unmerge(adapter_name)
            del module.adapters[adapter_name]
            if module.active_adapter == adapter_name:
                module.active_adapter = None
            if len(module.adapters) == 0:
                setattr(parent, attr, module.base_layer)
        elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
            del module.copies[adapter_name]
            if module.active_adapter == adapter_name:
                module.active_adapter = None
            if len(module.copies) == 0:
                setattr(parent, attr, module.original_module)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with lowrank.disable_adapters(model): ...`` runs the base model alone."""
    merged = {n for _, layer in adapted_layers(model) for n in layer.merged_adapters}
    if merged:
        raise RuntimeError(f"disable_adapters: adapters {sorted(merged)} are merged into the base; unmerge them first")
    modules = [m for _, m in adapted_layers(model)] + [m for _, m in _saved_modules(model)]
    before = [m.adapters_disabled for m in modules]
    for m in modules:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.adapters_disabled = flag


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------


def merge(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, dict]:
    """Folds ``adapter_name`` (default: the active one) into the base weight of every layer holding it;
    the forward then costs the base model's. Into a 4-bit base this requantizes and is lossy: it
    warns, and the returned dict maps each such layer to its error report."""
    name = _name_or_active(model, adapter_name)
    reports = {}
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            report = layer.merge(name)
            if report is not None:
                reports[layer_name] = report
    return reports


def unmerge(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Undoes :func:`merge` for ``adapter_name`` (default: every merged adapter, newest first)."""
    if adapter_name is not None:
        _require(model, adapter_name)
    for _, layer in adapted_layers(model):
        names = [adapter_name] if adapter_name is not None else list(reversed(layer.merged_adapters))
        for n in names:
            if n in layer.merged_adapters:
                layer.unmerge(n)


@torch.no_grad()
def merge_and_unload(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """The model with adapter ``adapter_name`` (default: the active one) folded in and lowrank's layers
    gone: ``nn.Linear`` (or GPT-2's ``Conv1D``) where there were adapters, dense again where the base
    was NF4 (``dequant(W) + ΔW`` exactly, in the weight's original dtype). Other adapters are dropped."""
    name = _name_or_active(model, adapter_name)
    for layer_name, module, parent, attr in list(_walk(model)):
        if isinstance(module, AdaptedLinear):
            setattr(parent, attr, _merged_module(module, name))
        elif isinstance(module, ModulesToSave):
            keep = module.copies[name] if name in module.copies else module.original_module
            setattr(parent, attr, keep)
    _plain_heads(model)
    return model


def _merged_module(layer: AdaptedLinear, name: str) -> nn.Module:
    base = layer.base_layer
    pending = name in layer.adapters and name not in layer.merged_adapters
    if layer.kind == "nf4":
        w = base.dequantize(torch.float32)
        if pending:
            w = w + layer.delta_weight(name)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=w.device,
                          dtype=base.weight_dtype)  # fmt: skip
        dense.weight.copy_(w)
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        return dense.requires_grad_(False)
    if pending:
        layer.merge(name)
    if layer.kind == "conv1d":
        plain_layout(base)  # its own [in, out] layout again (see rows_layout)
    return base


# ---------------------------------------------------------------------------------------------
# Parameters and their summary
# ---------------------------------------------------------------------------------------------


def adapter_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[tuple[str, Tensor]]:
    """``(name, parameter)`` of adapter ``adapter_name`` (default: the active one), modules_to_save
    copies included — what an optimizer of that adapter takes."""
    name = _name_or_active(model, adapter_name)
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            for pname, p in layer.adapters[name].named_parameters():
                yield f"{layer_name}.adapters.{name}.{pname}", p
    for saved_name, saved in _saved_modules(model):
        if name in saved.copies:
            for pname, p in saved.copies[name].named_parameters():
                yield f"{saved_name}.copies.{name}.{pname}", p


@dataclass
class TrainableSummary:
    """What trains and what the model holds: parameter counts (a 4-bit weight counts its ``out·in``
    values) and bytes (as stored; shared tensors once)."""

    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"trainable: {self.trainable_params:,} params ({self.trainable_percent:.4g}%), "
            f"{_mb(self.trainable_bytes)} | total: {self.total_params:,} params, {_mb(self.total_bytes)}"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable / total parameters and bytes of ``model``; ``print()`` it for one line."""
    seen: set[int] = set()
    trainable = total = trainable_bytes = total_bytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n, b = p.numel(), p.numel() * p.element_size()
        total += n
        total_bytes += b
        if p.requires_grad:
            trainable += n
            trainable_bytes += b
    storages: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            total += module.in_features * module.out_features
            total_bytes += module.nbytes()
            storages.update(t.data_ptr() for t in module.quant_state().values() if t is not None)
    for name, buf in model.named_buffers():
        if buf is None or buf.data_ptr() in storages or not buf.dtype.is_floating_point:
            continue
        storages.add(buf.data_ptr())
        total_bytes += buf.numel() * buf.element_size()
    return TrainableSummary(trainable, total, trainable_bytes, total_bytes)
