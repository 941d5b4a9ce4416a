"""``NF4Linear`` (a frozen 4-bit linear) and ``QLoRALinear`` (NF4 base + LoRA adapter).

The weight is stored as bitsandbytes stores it (``Linear4bit``, nf4, ``compress_statistics=True``):
packed codes in ``weight`` and the quantization state under bitsandbytes' state-dict keys
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so checkpoints move both ways. 4 bits per weight, 8 bits
per 64 weights and 32 per 16384: ~4.127 bits per parameter, and no dense copy is kept between calls.
"""

from __future__ import annotations

import json
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _autocast
from ..autograd import NF4LinearFunction
from ..ops import _direct
from ..ops import nf4 as _ops
from ..ops._direct import param, submodule
from .lora import LoRAAdapter, check_linear_args

_QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Quantize a dense ``[out, in]`` weight to NF4 (bitsandbytes-compatible bytes).

    Returns ``codes`` (uint8 ``[ceil(n/2), 1]``), ``absmax`` (uint8 with double quantization, else
    fp32), and with double quantization ``absmax2``, ``code2`` (the 256-entry dynamic map) and
    ``offset`` (a 0-d fp32 tensor, the mean of the fp32 scales).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [out_features, in_features], got shape {list(weight.shape)}")
    _ops._check_blocksize("blocksize", blocksize)
    w = weight.detach()
    codes, absmax = torch.ops.lowrank.nf4_quantize(w, blocksize)
    state = dict(codes=codes, absmax=absmax, absmax2=None, code2=None, offset=None)
    if double_quant:
        offset = absmax.mean()  # torch's mean, as bitsandbytes takes it: same bits
        code2 = _ops.dynamic_map(w.device)
        qabsmax, absmax2 = torch.ops.lowrank.nf4_double_quant(absmax, offset, code2, 256)
        state.update(absmax=qabsmax, absmax2=absmax2, code2=code2, offset=offset)
    return state


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4-bit NF4 with double-quantized scales.

    Args:
        in_features, out_features, bias, device: as ``nn.Linear``; the initial weight is
            ``nn.Linear``'s, quantized (use :meth:`from_linear` to quantize a trained one).
        blocksize: weights per absmax block (32 ... 4096; bitsandbytes' default 64).
        double_quant: quantize the absmax values too (8-bit, blocks of 256): 4.127 vs 4.5 bits/param.
        compute_dtype: dtype the product runs in (inputs are cast to it and the output cast back);
            None uses the input's dtype.
        dtype: dtype of the weight before quantization and of the bias.

    Inference (calls without gradients) on an AVX-512 CPU may keep a second, re-laid copy of the codes
    for its few-token kernel, about 1.1x the codes' bytes, where that kernel was measured faster
    (``ops.nf4.TiledWeight``); ``train()`` frees it. Set ``tiled_inference = False`` (on a layer, or on
    the class for every layer) to keep inference on the codes as stored: no second copy, the row-major
    kernels.
    """

    tiled_inference: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        check_linear_args(in_features, out_features, dtype)
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantized(dense.weight.data, dense.bias, blocksize, double_quant, compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ):
        """Quantize an ``nn.Linear`` (its weight is read, not kept; its bias is shared, frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_quantized(linear.weight.data, linear.bias, blocksize, double_quant, compute_dtype)
        self._init_extra(**kwargs)
        return self

    def _init_extra(self, **kwargs) -> None:
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")

    def _init_quantized(self, weight: Tensor, bias, blocksize, double_quant, compute_dtype) -> None:
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight: expected a floating-point weight, got {weight.dtype}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"compute_dtype: expected float32, bfloat16 or float16, got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = blocksize
        self.blocksize2 = 256
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight.dtype  # the dtype bitsandbytes records (dequantize's default)
        w = weight if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else weight.float()
        self._set_state(quantize_nf4(w, blocksize, double_quant))
        if bias is not None:
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            bias.requires_grad_(False)
        self.bias = bias

    def _set_state(self, st: dict) -> None:
        self.register_buffer("weight", st["codes"])
        self.register_buffer("weight_absmax", st["absmax"])
        self.register_buffer("weight_absmax2", st["absmax2"])
        self.register_buffer("weight_code2", st["code2"])
        self.register_buffer("weight_offset", st["offset"])

    _QUANT_BUFFERS = ("weight", "weight_absmax", "weight_absmax2", "weight_code2", "weight_offset")

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not touch the quantization state (its dtypes are the format):
        # the packed buffers only follow device moves.
        saved = {name: self._buffers[name] for name in self._QUANT_BUFFERS}
        for name in self._QUANT_BUFFERS:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in saved.items():
                if t is not None:
                    t = t.to(fn(torch.empty(0, device=t.device)).device)
                self._buffers[name] = t
        return self

    @property
    def double_quant(self) -> bool:
        return self.weight_absmax2 is not None

    def weight_args(self) -> tuple:
        """The packed weight as the NF4 ops take it (lowrank/ops/nf4.py). (Read from ``_buffers``, where
        ``register_buffer`` and assignment put them: five ``Module.__getattr__`` calls cost 2.5 µs a call.)"""
        b = self._buffers
        return (
            b["weight"],
            b["weight_absmax"],
            b["weight_absmax2"],
            b["weight_code2"],
            b["weight_offset"],
            [self.out_features, self.in_features],
            self.blocksize,
            self.blocksize2,
        )

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight ``[out, in]`` (decoded in fp32, rounded once to ``dtype``; default: the
        dtype the weight had before quantization)."""
        return torch.ops.lowrank.nf4_dequantize(*self.weight_args(), dtype or self.weight_dtype)

    def quant_state(self) -> dict:
        """The packed weight's tensors (``codes``, ``absmax``, ``absmax2``, ``code2``, ``offset``), as
        :meth:`restore_quant_state` takes them back."""
        return dict(codes=self.weight, absmax=self.weight_absmax, absmax2=self.weight_absmax2,
                    code2=self.weight_code2, offset=self.weight_offset)  # fmt: skip

    def restore_quant_state(self, state: dict) -> None:
        """Adopt a :meth:`quant_state` taken earlier (e.g. to undo :meth:`add_delta_lossy`)."""
        self._set_state(state)

    @torch.no_grad()
    def add_delta_lossy(self, delta: Tensor, what: str = "NF4Linear.add_delta_lossy") -> tuple[dict, dict]:
        """Requantize ``dequant(W) + delta`` in place. **Lossy**: warns and returns ``(report, previous)``,
        the error of the new 4-bit weight against the exact sum (``max_abs_error``, ``mean_abs_error``,
        and ``adapter_mean_abs`` = mean ``|delta|`` for scale) and the previous :meth:`quant_state`,
        which :meth:`restore_quant_state` brings back exactly."""
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta: expected shape [{self.out_features}, {self.in_features}], got {list(delta.shape)}")
        delta = delta.float()
        exact = self.dequantize(torch.float32) + delta
        previous = self.quant_state()
        self._set_state(quantize_nf4(exact, self.blocksize, self.double_quant))
        err = (self.dequantize(torch.float32) - exact).abs()
        report = {
            "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()),
            "adapter_mean_abs": float(delta.abs().mean()),
        }
        warnings.warn(
            f"{what}: merging into a 4-bit base requantizes W + ΔW and is lossy "
            f"(mean abs error {report['mean_abs_error']:.3g}, max {report['max_abs_error']:.3g}, against a mean "
            f"|ΔW| of {report['adapter_mean_abs']:.3g}); merge_and_unload() / merged_linear() give an exact dense copy",
            stacklevel=3,
        )
        return report, previous

    def nbytes(self) -> int:
        """Bytes the quantized weight occupies (codes and scales, not the bias)."""
        parts = (self.weight, self.weight_absmax, self.weight_absmax2, self.weight_code2, self.weight_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    # ---- forward -----------------------------------------------------------------------------
    def _forward(self, x: Tensor, lora_a, lora_b, scale: float, adapter_input) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        autocast = _autocast.dtype_for(x)
        if autocast is not None:  # computes and returns in autocast's dtype, as F.linear (lowrank/_autocast.py)
            x, adapter_input = _autocast.cast(x, autocast), _autocast.cast(adapter_input, autocast)
            if lora_a is not None:
                lora_a, lora_b = _autocast.cast_adapter(autocast, lora_a, lora_b)
            with _autocast.off(x):  # (autocast's dtype, not compute_dtype, as bitsandbytes' Linear4bit)
                return self._product(x, lora_a, lora_b, scale, adapter_input)
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
            if adapter_input is not None:
                adapter_input = adapter_input.to(self.compute_dtype)
        y = self._product(x, lora_a, lora_b, scale, adapter_input)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _product(self, x: Tensor, lora_a, lora_b, scale: float, adapter_input) -> Tensor:
        """The product in x's dtype (the bias and the factors cast to it where the kernels need)."""
        bias = param(self, "bias")
        if bias is not None and bias.dtype not in (x.dtype, torch.float32):
            bias = bias.to(x.dtype)
        if lora_a is not None and lora_a.dtype not in (x.dtype, torch.float32):
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        args = (x, *self.weight_args(), bias, lora_a, lora_b, scale, adapter_input)
        if torch.is_grad_enabled():
            y, _ = _direct.apply(NF4LinearFunction, *args)
        elif adapter_input is None:  # inference: the packed weight's kernel view built once (ops/nf4.py)
            frozen = self.__dict__.get("_frozen")
            if frozen is None:  # every way a layer is made (constructor, from_linear, state dict) ends here
                frozen = self._frozen = _ops.Nf4Frozen()
            y = _ops.forward_fast(frozen, *args[:13], tiled=self.tiled_inference)
        else:
            y, _ = (_ops._forward_native if _direct.ok(x) else torch.ops.lowrank.nf4_linear_forward)(*args)
        return y

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, None, None, 1.0, None)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; training also frees the tiled inference copy of the codes, if one was
        made (``ops.nf4.TiledWeight``: made again by the next few-token call without gradients)."""
        frozen = self.__dict__.get("_frozen")
        if mode and frozen is not None:
            frozen.drop_tiled()
        return super().train(mode)

    # ---- bitsandbytes-compatible state dict --------------------------------------------------
    def _quant_state_dict(self) -> dict:
        info = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES.get(self.weight_dtype, "float32"),
            "shape": [self.out_features, self.in_features],
        }
        out = {"absmax": self.weight_absmax, "quant_map": _ops.nf4_table(self.weight.device).clone()}
        if self.double_quant:
            out.update(nested_absmax=self.weight_absmax2, nested_quant_map=self.weight_code2)
            info.update(nested_blocksize=self.blocksize2, nested_dtype="float32",
                        nested_offset=float(self.weight_offset.item()))  # fmt: skip
        out[_QS_KEY] = torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for k, v in self._quant_state_dict().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        wkey = prefix + "weight"
        qs_prefix = wkey + "."
        qs = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        if wkey not in state_dict:
            missing_keys.append(wkey)
        elif _QS_KEY not in qs:
            w = state_dict[wkey]
            if w.dtype.is_floating_point and tuple(w.shape) == (self.out_features, self.in_features):
                # a dense nn.Linear checkpoint: quantize it
                self._set_state({k: v.to(self.weight.device) if v is not None else None for k, v in
                                 quantize_nf4(w.to(self.weight.device), self.blocksize, self.double_quant).items()})  # fmt: skip
                self.weight_dtype = w.dtype
            else:
                error_msgs.append(f"{wkey}: no '{qs_prefix}{_QS_KEY}' entry: not an NF4 (bitsandbytes) checkpoint")
        else:
            try:
                assign = local_metadata.get("assign_to_params_buffers", False)
                self._load_quant_state(state_dict[wkey], qs, copy=not assign)
            except (ValueError, KeyError, TypeError) as e:
                error_msgs.append(f"{wkey}: {e}")
        for k in qs:
            if k not in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY):
                unexpected_keys.append(qs_prefix + k)
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey in state_dict:
                b = state_dict[bkey]
                if tuple(b.shape) != tuple(self.bias.shape):
                    error_msgs.append(f"{bkey}: expected shape {list(self.bias.shape)}, got {list(b.shape)}")
                else:
                    with torch.no_grad():
                        self.bias.copy_(b)
            else:
                missing_keys.append(bkey)
        elif bkey in state_dict:
            unexpected_keys.append(bkey)
        # Submodules (QLoRALinear's adapter) load through their own modules.

    def _load_quant_state(self, codes: Tensor, qs: dict, copy: bool = True) -> None:
        raw = qs[_QS_KEY]
        info = json.loads(bytes(raw.to("cpu", torch.uint8).tolist()).decode("utf-8"))  # data, never code
        if info.get("quant_type") != "nf4":
            raise ValueError(f"quant_type {info.get('quant_type')!r} is not supported (only nf4)")
        shape = [int(s) for s in info["shape"]]
        if shape != [self.out_features, self.in_features]:
            raise ValueError(f"expected shape [{self.out_features}, {self.in_features}], got {shape}")
        quant_map = qs["quant_map"].float()
        if not torch.equal(quant_map.cpu(), _ops.nf4_table()):
            raise ValueError("quant_map is not the NF4 table")
        dev = self.weight.device
        nested = "nested_absmax" in qs
        # Copies, as load_state_dict copies into a module's tensors (unless assign=True): the layer must not
        # share memory with the state dict it was loaded from (another layer's buffers, written in place later).
        st = dict(codes=codes.to(dev, torch.uint8, copy=copy).reshape(-1, 1), absmax=qs["absmax"].to(dev, copy=copy),
                  absmax2=None, code2=None, offset=None)  # fmt: skip
        blocksize2 = 256
        if nested:
            blocksize2 = int(info["nested_blocksize"])
            st.update(absmax2=qs["nested_absmax"].to(dev, torch.float32, copy=copy),
                      code2=qs["nested_quant_map"].to(dev, torch.float32, copy=copy),
                      offset=torch.tensor(float(info["nested_offset"]), dtype=torch.float32, device=dev))  # fmt: skip
        else:
            st["absmax"] = st["absmax"].float()
        blocksize = int(info["blocksize"])
        # validate every size before adopting it
        _ops._check_weight(st["codes"], st["absmax"], st["absmax2"], st["code2"], st["offset"], shape, blocksize,
                           blocksize2)  # fmt: skip
        self.blocksize, self.blocksize2 = blocksize, blocksize2
        self.weight_dtype = getattr(torch, info.get("dtype", "float32"), torch.float32)
        self._set_state(st)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


class QLoRALinear(LoRAAdapter, NF4Linear):
    """An NF4 base (:class:`NF4Linear`) plus a trainable LoRA adapter: QLoRA.

    Same LoRA options, init and PEFT key names as :class:`LoRALinear` (both are :class:`LoRAAdapter`) (``lora_A.weight`` [r, in],
    ``lora_B.weight`` [out, r], ``s = alpha / r`` or ``alpha / sqrt(r)``). Forward and backward run the
    fused NF4 kernels with the adapter term added in the same pass.

    Merging into a 4-bit base is lossy (``W + s·BA`` must be requantized): :meth:`merge` warns and
    returns the error it made; :meth:`merged_linear` gives an exact dense ``nn.Linear`` instead.
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
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype, blocksize=blocksize,
                         double_quant=double_quant, compute_dtype=compute_dtype)  # fmt: skip
        self._init_extra(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "QLoRALinear":
        """Quantize ``linear`` to NF4 and attach a fresh LoRA adapter (adapter_dtype defaults to the
        compute dtype, else the linear's dtype)."""
        return super().from_linear(linear, blocksize, double_quant, compute_dtype, r=r, alpha=alpha,
                                   dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)  # fmt: skip

    def _init_extra(self, *, r=8, alpha=8.0, dropout=0.0, use_rslora=False, adapter_dtype=None) -> None:
        dtype = adapter_dtype or self.compute_dtype or self.weight_dtype
        self._init_adapter(r, alpha, dropout, use_rslora, self.weight.device, dtype)
        self.merged = False
        self._unmerged_state = None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._forward(x, None, None, 1.0, None)
        adapter_input = None
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            adapter_input = self.lora_dropout(x)
        lora_a, lora_b = param(submodule(self, "lora_A"), "weight"), param(submodule(self, "lora_B"), "weight")
        return self._forward(x, lora_a, lora_b, self.scaling, adapter_input)

    @torch.no_grad()
    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A dense ``nn.Linear`` holding ``dequant(W) + s·B A`` exactly (in fp32, then ``dtype``)."""
        dtype = dtype or self.weight_dtype
        w = self.dequantize(torch.float32)
        if not self.merged:
            w = w + self.delta_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    @torch.no_grad()
    def merge(self) -> dict:
        """Fold the adapter into the 4-bit base by requantizing ``dequant(W) + s·B A``. **Lossy.**

        Warns, and returns the error of the merged 4-bit weight against the exact sum
        (``max_abs_error``, ``mean_abs_error``, and ``adapter_mean_abs`` for scale). The original
        codes are kept until :meth:`unmerge`, which restores them exactly. For an exact merge use
        :meth:`merged_linear`.
        """
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        report, self._unmerged_state = self.add_delta_lossy(self.delta_weight(), what="QLoRALinear.merge")
        self.merged = True
        return report

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the original 4-bit weight comes back exactly."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.restore_quant_state(self._unmerged_state)
        self._unmerged_state = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"
