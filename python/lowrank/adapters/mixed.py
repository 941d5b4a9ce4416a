"""Mixed-adapter batches for whole models: each row of a batch uses its own adapter.

    with lowrank.mixed_batch(model, ["alice", "bob", "__base__", "alice"]):
        logits = model(input_ids).logits          # row 0 and 3 through "alice", row 1 "bob", row 2 none
        out = model.generate(input_ids, max_new_tokens=20)

One name per batch row (``"__base__"`` for the base alone). Every adapted layer then runs one
forward for the whole batch: the base weight is read once, and each row gets its own adapter's term
from the fused mixed kernels (``lowrank.ops.mixed``) — LoRA and VeRA adapters of any rank and
scaling, over ``nn.Linear``, GPT-2 ``Conv1D`` and 4-bit (QLoRA) bases. Gradients work too: each
adapter gets the gradient of its own rows.

Inside the block the layers read the adapters through raw views built once per layer (held with
the tensors they point into); do not move or replace adapter tensors inside the block.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _autocast
from .._validate import last_dim_contiguous, matrix, optional_matrix
from ..ops import _direct
from ..ops import mixed as _ops
from .layer import BASE_ONLY, AdaptedLinear, ModulesToSave, dense_rows

_METHODS = ("lora", "vera")


class MixedBatch:
    """The per-row adapter names of one batch, shared by every layer while the block is active; it
    caches the row plan per (adapters present in a layer, token count) and each layer's adapter view."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._plans: dict = {}
        self._tables: dict = {}
        self._present: dict = {}

    def present(self, layer_adapters) -> tuple[str, ...]:
        """The adapters of this batch a layer holds, in order of first use in the batch."""
        key = tuple(layer_adapters)
        got = self._present.get(key)
        if got is None:
            held = set(key)
            got = self._present[key] = tuple(dict.fromkeys(n for n in self.names if n in held))
        return got

    def plan(self, present: tuple[str, ...], m: int, device: torch.device):
        """``(order, offsets, order's Matrix view, offsets' view)`` for a layer holding ``present``."""
        key = (present, m, device)
        got = self._plans.get(key)
        if got is None:
            rows = len(self.names)
            ids = torch.tensor([present.index(n) if n in present else -1 for n in self.names], dtype=torch.int64)
            ids = ids.repeat_interleave(m // rows)  # tokens of one row are consecutive ([batch, seq, ...])
            order, offsets = _ops.plan_rows(ids, len(present))
            order, offsets = order.to(device), offsets.to(device)
            got = self._plans[key] = (order, offsets, matrix("order", order), matrix("offsets", offsets))
        return got

    # ---- the layers' forward --------------------------------------------------------------------
    def _check_rows(self, x: Tensor, what: str) -> None:
        rows = len(self.names)
        if x.dim() < 2 or x.shape[0] != rows:
            raise ValueError(
                f"mixed_batch: {rows} adapter names (one per batch row) but {what} got an input of shape "
                f"{list(x.shape)}; the first dimension must be the batch"
            )

    def linear_forward(self, layer: AdaptedLinear, x: Tensor) -> Tensor:
        if layer.merged_adapters:
            raise RuntimeError(f"mixed_batch: adapters {layer.merged_adapters} are merged into a base; unmerge first")
        if layer.adapters_disabled:
            return layer.base_forward(x)
        present = self.present(layer.adapters.keys())
        if not present:
            return layer.base_forward(x)
        self._check_rows(x, "a layer")
        autocast = _autocast.dtype_for(x)
        if autocast is not None:  # F.linear's casts, the kernels without autocast (lowrank/_autocast.py)
            with _autocast.off(x):
                return self._product(layer, present, _autocast.cast(x, autocast), autocast)
        return self._product(layer, present, x, None)

    def _product(self, layer: AdaptedLinear, present: tuple[str, ...], x: Tensor, autocast) -> Tensor:
        base = layer.base_layer
        rows = dense_rows(layer)
        if rows is not None:  # nn.Linear, or a Conv1D re-laid as [out, in] rows (layer.py's rows_layout)
            weight, bias, base_out = rows, base.bias, None
            if autocast is not None:
                weight, bias = _autocast.cast_frozen(weight, autocast), _autocast.cast(bias, autocast)
        else:  # 4-bit (or a Conv1D left as it was): the base runs itself; its output enters the kernel's accumulator
            weight, bias, base_out = None, None, base(x).float()
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        order, offsets, order_m, offsets_m = self.plan(present, m, x.device)
        # (the cached table keeps views of W: not of a copy cast for one call)
        if not torch.is_grad_enabled() and _direct.ok(x) and _ops.runs_native(x) and autocast is None:
            key = (id(layer), present, x.dtype)
            cached = self._tables.get(key)
            if cached is None:
                # The view holds raw pointers: it is kept with the very tensors it points into.
                adapters = [layer.adapters[n] for n in present]
                factors = [_factors(ad, x.dtype) for ad in adapters]
                table, keep = _ops.adapter_table(*(list(t) for t in zip(*factors)), transposed=True)
                has_dropout = any(isinstance(_dropout_of(ad), nn.Dropout) for ad in adapters)
                weight = None if weight is None else last_dim_contiguous(weight)
                bias = None if bias is None else bias.contiguous()
                views = (optional_matrix("weight", weight), optional_matrix("bias", bias))
                cached = self._tables[key] = (table, keep + [weight, bias], has_dropout, weight, bias, views)
            if not (cached[2] and layer.training):
                table, _, _, weight, bias, (weight_m, bias_m) = cached
                views = (order_m, offsets_m, weight_m, bias_m)
                return _ops.run(x, weight, bias, base_out, order, offsets, table, views=views)[0]
        adapters = [layer.adapters[n] for n in present]
        lora_a, lora_b, v_scale, col_scale, scales = (list(t) for t in zip(*(_factors(ad, x.dtype) for ad in adapters)))
        adapter_input = _dropout_input(adapters, x, order, offsets)
        args = (x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input)
        if not torch.is_grad_enabled() and _direct.ok(x):
            return _ops._forward_native(*args)[0]
        return torch.ops.lowrank.mixed_linear_forward(*args)[0]

    def saved_forward(self, module: ModulesToSave, x: Tensor, *args, **kwargs):
        """``modules_to_save`` copies: each present copy runs on its own rows (a loop over the copies
        present; these are whole modules, not the kernels' hot path)."""
        if module.adapters_disabled:
            return module.original_module(x, *args, **kwargs)
        present = [n for n in dict.fromkeys(self.names) if n in module.copies]
        if not present:
            return module.original_module(x, *args, **kwargs)
        self._check_rows(x, "a modules_to_save module")
        y = module.original_module(x, *args, **kwargs)
        if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
            raise TypeError("mixed_batch: a modules_to_save module must map a batch tensor to a batch tensor")
        y = y.clone()
        for name in present:
            rows = torch.tensor([i for i, n in enumerate(self.names) if n == name], device=x.device)
            y[rows] = module.copies[name](x[rows], *args, **kwargs).to(y.dtype)
        return y


def _factors(adapter: nn.Module, dtype: torch.dtype):
    """``(A, B, d, c, s)`` of one adapter in the form the mixed op takes (see ops/mixed.py)."""
    if adapter.method == "lora":
        a, b = adapter.lora_A.weight, adapter.lora_B.weight
        d = c = None
        s = adapter.scaling
    elif adapter.method == "vera":
        a, b = adapter.projection_slices()
        d, c, s = adapter.vera_lambda_d, adapter.vera_lambda_b, 1.0
    else:
        raise TypeError(f"mixed_batch: adapter method {adapter.method!r} cannot run in a mixed batch (LoRA and VeRA can)")
    if a.dtype not in (dtype, torch.float32):
        a, b = a.float(), b.float()
    elif b.dtype != a.dtype:
        b = b.to(a.dtype)
    if d is not None and d.dtype != torch.float32:
        d = d.float()
    if c is not None and c.dtype != torch.float32:
        c = c.float()
    return a, b, d, c, float(s)


def _dropout_of(adapter: nn.Module) -> Optional[nn.Module]:
    return getattr(adapter, "lora_dropout", None) or getattr(adapter, "vera_dropout", None)


def _dropout_input(adapters, x: Tensor, order: Tensor, offsets: Tensor) -> Optional[Tensor]:
    """``x`` with each adapter's own dropout applied to its rows (training only), else None."""
    drops = [_dropout_of(ad) for ad in adapters]
    active = [isinstance(d, nn.Dropout) and ad.training for d, ad in zip(drops, adapters)]
    if not any(active):
        return None
    flat = x.reshape(-1, x.shape[-1])
    xa = flat.clone()
    bounds = offsets.tolist()
    for i, (drop, on) in enumerate(zip(drops, active)):
        if on and bounds[i + 1] > bounds[i]:
            rows = order[bounds[i] : bounds[i + 1]].long()
            xa[rows] = drop(flat[rows])
    return xa.reshape(x.shape)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """``with lowrank.mixed_batch(model, names): model(...)`` — row ``i`` of every batch inside the block
    uses adapter ``names[i]`` (``"__base__"``: the base alone). Works through ``model.generate``."""
    from .model import _all_adapter_names, _walk

    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or len(adapter_names) == 0:
        raise TypeError(f"adapter_names: expected a non-empty list of names, one per batch row, got {adapter_names!r}")
    known = _all_adapter_names(model)
    for i, name in enumerate(adapter_names):
        if not isinstance(name, str) or (name != BASE_ONLY and name not in known):
            raise ValueError(f"adapter_names[{i}]: no adapter named {name!r} in the model (it has {known}, or {BASE_ONLY!r})")
    modules = [m for _, m, _, _ in _walk(model) if isinstance(m, (AdaptedLinear, ModulesToSave))]
    used = set(adapter_names) - {BASE_ONLY}
    for m in modules:
        if isinstance(m, AdaptedLinear):
            for name in used & set(m.adapters.keys()):
                method = m.adapters[name].method
                if method not in _METHODS:
                    raise TypeError(
                        f"adapter_names: adapter {name!r} is {method!r}; mixed batches take LoRA and VeRA adapters"
                    )
            if used & set(m.merged_adapters):
                raise RuntimeError(f"mixed_batch: adapters {sorted(used & set(m.merged_adapters))} are merged; unmerge first")
    batch = MixedBatch(adapter_names)
    before = [m._mixed for m in modules]
    for m in modules:
        m._mixed = batch
    try:
        yield model
    finally:
        for m, prev in zip(modules, before):
            m._mixed = prev
