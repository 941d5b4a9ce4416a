"""Adapter configurations: one dataclass per method, each a JSON round trip.

``LoRAConfig`` and ``VeRAConfig`` write PEFT's ``adapter_config.json`` (``peft_type`` ``LORA`` /
``VERA``, PEFT's field names), so PEFT loads lowrank's adapters and lowrank loads PEFT's.
``QLoRAConfig`` is a LoRA adapter over a base that :func:`lowrank.inject` stores as NF4; its file is
PEFT's LoRA config (the quantization belongs to the base, as with PEFT + bitsandbytes). ``FullConfig``
(full fine-tuning as a dense delta per layer) has no PEFT counterpart and writes ``peft_type``
``LOWRANK_FULL``.

``target_modules`` / ``exclude_modules`` take a list of module-name suffixes (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``), a regular expression (a ``str``, matched against the whole
name), or ``"all-linear"`` (every ``nn.Linear`` / GPT-2 ``Conv1D`` but the output head).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

TargetSpec = Union[str, list, tuple, None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_targets(name: str, value: TargetSpec, *, required: bool) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name}: expected module-name suffixes, a regex or 'all-linear', got None")
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name}: expected a non-empty regex, suffix list or 'all-linear', got ''")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name}: expected a valid regular expression, got {value!r} ({e})") from None
        return
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise TypeError(f"{name}: expected a list of module-name suffixes, a regex string or 'all-linear', got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _probability(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")


def _dtype_or_none(name: str, value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in _DTYPES.values():
            raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {value}")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise TypeError(f"{name}: expected a torch dtype (float32, bfloat16, float16) or None, got {value!r}")


def _listify(value: TargetSpec):
    return sorted(value) if isinstance(value, (set, tuple, list)) else value


@dataclass
class AdapterConfig:
    """Fields every method shares. Subclasses set ``method`` and ``peft_type``."""

    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    modules_to_save: Optional[list] = None

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_targets("target_modules", self.target_modules, required=True)
        _check_targets("exclude_modules", self.exclude_modules, required=False)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise TypeError(f"modules_to_save: expected a list of module-name suffixes, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = _listify(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = _listify(self.exclude_modules)

    # ---- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, plus ``method``: ``from_dict(c.to_dict()) == c`` (dtypes as their names)."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_peft_dict(self) -> dict:
        """The ``adapter_config.json`` content: PEFT's field names where PEFT has the method."""
        raise NotImplementedError

    @staticmethod
    def from_dict(data: dict) -> "AdapterConfig":
        """The config a :meth:`to_dict` result or an ``adapter_config.json`` (lowrank's or PEFT's)
        describes."""
        if not isinstance(data, dict):
            raise TypeError(f"adapter config: expected a JSON object, got {type(data).__name__}")
        if "method" in data and "peft_type" not in data:
            method = data["method"]
            classes = {c.method: c for c in (LoRAConfig, QLoRAConfig, VeRAConfig, FullConfig)}
            if method not in classes:
                raise ValueError(f"adapter config: method {method!r} is not one of {sorted(classes)}")
            cls = classes[method]
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - names - {"method"})
            if unknown:
                raise ValueError(f"adapter config: unknown fields {unknown} for {cls.__name__}")
            return cls(**{k: v for k, v in data.items() if k != "method"})
        peft_type = data.get("peft_type")
        for cls in (LoRAConfig, VeRAConfig, FullConfig):
            if peft_type == cls.peft_type:
                return cls._from_file_dict(data)
        raise ValueError(
            f"adapter config: peft_type {peft_type!r} is not supported (lowrank loads LORA, VERA and LOWRANK_FULL)"
        )

    @staticmethod
    def from_json(text: str) -> "AdapterConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter config: not valid JSON ({e})") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise ValueError("adapter config: JSON nested too deeply") from None
        return AdapterConfig.from_dict(data)

    @classmethod
    def _from_file_dict(cls, data: dict) -> "AdapterConfig":
        raise NotImplementedError

    @staticmethod
    def _get(data: dict, key: str, default: Any, types: tuple) -> Any:
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            raise TypeError(f"adapter config: {key!r} must be {names}, got {value!r}")
        return value

    def _common_file_fields(self) -> dict:
        return {
            "peft_type": self.peft_type,
            "target_modules": _listify(self.target_modules),
            "exclude_modules": _listify(self.exclude_modules),
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "task_type": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
        }

    @classmethod
    def _common_from_file(cls, data: dict) -> dict:
        bias = data.get("bias", "none")
        if bias != "none":
            raise ValueError(f"adapter config: bias={bias!r} is not supported (lowrank adapters train no bias terms)")
        targets = cls._get(data, "target_modules", None, (list, str))
        return {
            "target_modules": targets if targets is not None else "all-linear",
            "exclude_modules": cls._get(data, "exclude_modules", None, (list, str)),
            "modules_to_save": cls._get(data, "modules_to_save", None, (list,)),
        }


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``W' = W + s·B A`` with ``A:[r, in]``, ``B:[out, r]``, ``s = alpha / r`` (``alpha / √r`` with
    ``use_rslora``); PEFT's defaults (``r=8``, ``alpha=8``)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    adapter_dtype: Any = None

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise TypeError(f"alpha: expected a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        _probability("dropout", self.dropout)
        self.adapter_dtype = _dtype_or_none("adapter_dtype", self.adapter_dtype)

    def to_peft_dict(self) -> dict:
        out = self._common_file_fields()
        out.update(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.use_rslora,
                   fan_in_fan_out=False, init_lora_weights=True, use_dora=False)  # fmt: skip
        return out

    @classmethod
    def _from_file_dict(cls, data: dict) -> "LoRAConfig":
        for unsupported in ("use_dora", "lora_bias"):
            if data.get(unsupported):
                raise ValueError(f"adapter config: {unsupported}=true is not supported by lowrank")
        for pattern in ("rank_pattern", "alpha_pattern"):
            if data.get(pattern):
                raise ValueError(f"adapter config: a non-empty {pattern} is not supported by lowrank")
        return cls(
            **cls._common_from_file(data),
            r=cls._get(data, "r", 8, (int,)),
            alpha=cls._get(data, "lora_alpha", 8, (int, float)),
            dropout=cls._get(data, "lora_dropout", 0.0, (int, float)),
            use_rslora=cls._get(data, "use_rslora", False, (bool,)),
        )


@dataclass
class QLoRAConfig(LoRAConfig):
    """QLoRA: LoRA over bases stored as NF4 (bitsandbytes' format, double-quantized scales).

    ``quantize_base="targets"`` quantizes the targeted layers; ``"all-linear"`` also every other
    ``nn.Linear`` of the model but the output head (as QLoRA does). ``compute_dtype`` is the dtype the
    4-bit weight is decoded to for its products (default: the input's)."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Any = None
    quantize_base: str = "targets"

    method: ClassVar[str] = "qlora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize: expected one of 32, 64, ..., 4096, got {self.blocksize!r}")
        if self.quantize_base not in ("targets", "all-linear"):
            raise ValueError(f"quantize_base: expected 'targets' or 'all-linear', got {self.quantize_base!r}")
        self.compute_dtype = _dtype_or_none("compute_dtype", self.compute_dtype)


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA: ``W' = W + Λ_b B Λ_d A`` with one frozen random pair ``A, B`` shared by every layer;
    PEFT's defaults (``r=256``, ``d_initial=0.1``, projections from ``projection_prng_key=0``)."""

    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    adapter_dtype: Any = None

    method: ClassVar[str] = "vera"
    peft_type: ClassVar[str] = "VERA"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("r", self.r)
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise TypeError(f"d_initial: expected a number, got {self.d_initial!r}")
        _probability("dropout", self.dropout)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise TypeError(f"projection_prng_key: expected an int, got {self.projection_prng_key!r}")
        self.adapter_dtype = _dtype_or_none("adapter_dtype", self.adapter_dtype)

    def to_peft_dict(self) -> dict:
        out = self._common_file_fields()
        if self.exclude_modules is None:
            del out["exclude_modules"]  # PEFT's VeraConfig has no such field (a set one is still written)
        out.update(r=self.r, d_initial=self.d_initial, vera_dropout=self.dropout, fan_in_fan_out=False,
                   projection_prng_key=self.projection_prng_key, save_projection=self.save_projection,
                   init_weights=True)  # fmt: skip
        return out

    @classmethod
    def _from_file_dict(cls, data: dict) -> "VeRAConfig":
        return cls(
            **cls._common_from_file(data),
            r=cls._get(data, "r", 256, (int,)),
            d_initial=cls._get(data, "d_initial", 0.1, (int, float)),
            dropout=cls._get(data, "vera_dropout", 0.0, (int, float)),
            projection_prng_key=cls._get(data, "projection_prng_key", 0, (int,)),
            save_projection=cls._get(data, "save_projection", True, (bool,)),
        )


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning as an adapter: each targeted layer trains a dense ``ΔW`` (and ``Δbias``) while
    its own ``W`` stays frozen, so it swaps, saves and merges like the low-rank methods."""

    method: ClassVar[str] = "full"
    peft_type: ClassVar[str] = "LOWRANK_FULL"

    def to_peft_dict(self) -> dict:
        out = self._common_file_fields()
        del out["bias"]
        return out

    @classmethod
    def _from_file_dict(cls, data: dict) -> "FullConfig":
        return cls(**cls._common_from_file({**data, "bias": "none"}))


def config_fields(config: AdapterConfig) -> dict:
    """The dataclass fields as a plain dict (for reports)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


__all__ = ["AdapterConfig", "LoRAConfig", "QLoRAConfig", "VeRAConfig", "FullConfig", "config_fields"]
