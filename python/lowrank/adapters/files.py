"""Adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``, in PEFT's format.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (LoRA and QLoRA),
``base_model.model.<module>.vera_lambda_d`` / ``vera_lambda_b`` plus ``base_model.vera_A`` /
``base_model.vera_B`` (VeRA, with ``save_projection``), ``base_model.model.<module>.<param>`` for a
``modules_to_save`` copy; full fine-tuning writes ``base_model.model.<module>.full_delta.weight``
(and ``.bias``): ``ΔW`` in the layer's own layout. So ``PeftModel.from_pretrained`` loads lowrank's
LoRA and VeRA adapters and :func:`load_adapter` loads PEFT's.

Saving writes a complete new directory next to the target and swaps it in with one atomic rename:
a crash at any point leaves the previous adapter whole. Loading reads JSON and safetensors only
(never pickle), checks every tensor against the model first, and changes nothing when it fails.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .config import AdapterConfig, VeRAConfig
from .layer import AdaptedLinear, base_features, base_kind, check_adapter_name
from .model import (
    _all_adapter_names,
    _check_method_fits,
    _make_adapter,
    _modules_to_save_targets,
    _name_or_active,
    _saved_modules,
    _vera_projections,
    _walk,
    adapted_layers,
    adapter_config,
    attach,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")
_ADAPTER_SUFFIXES = {
    "lora_A.weight": "lora",
    "lora_B.weight": "lora",
    "vera_lambda_d": "vera",
    "vera_lambda_b": "vera",
    "full_delta.weight": "full",
    "full_delta.bias": "full",
}


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model (the model is left unchanged)."""


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, Tensor]:
    """The tensors ``save_adapter`` writes, under PEFT's keys (contiguous CPU copies)."""
    name = _name_or_active(model, adapter_name)
    config = adapter_config(model, name)
    out: dict[str, Tensor] = {}
    projections = None
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if adapter.method == "full":
            tensors = adapter.file_tensors_for(layer.base_layer)
        else:
            tensors = adapter.file_tensors()
        for key, t in tensors.items():
            out[f"{_PREFIX}{layer_name}.{key}"] = t
        if adapter.method == "vera" and projections is None:
            projections = (adapter.vera_A, adapter.vera_B)
    if isinstance(config, VeRAConfig) and config.save_projection and projections is not None:
        out[_VERA_SHARED[0]], out[_VERA_SHARED[1]] = projections
    for saved_name, saved in _saved_modules(model):
        if name in saved.copies:
            for key, t in saved.copies[name].state_dict().items():
                out[f"{_PREFIX}{saved_name}.{key}"] = t
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_adapter(model: nn.Module, path, adapter_name: Optional[str] = None) -> Path:
    """Writes adapter ``adapter_name`` (default: the active one) to directory ``path``
    (``adapter_model.safetensors`` + ``adapter_config.json``), atomically. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    name = _name_or_active(model, adapter_name)
    tensors = adapter_state_dict(model, name)
    config = adapter_config(model, name).to_peft_dict()
    if "fan_in_fan_out" in config:  # PEFT's flag for GPT-2 Conv1D layers (weights stored [in, out])
        config["fan_in_fan_out"] = any(layer.kind == "conv1d" for _, layer in adapted_layers(model)
                                       if name in layer.adapters)  # fmt: skip
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path: {path} exists and is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(staging / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for file in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(staging / file)
        if path.exists():
            _swap_directories(staging, path)  # staging now holds the previous adapter
        else:
            try:
                os.rename(staging, path)
            except OSError as e:  # another save created path meanwhile: replace its adapter as a whole
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not path.is_dir():
                    raise
                _swap_directories(staging, path)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_directories(a: Path, b: Path) -> None:
    """Exchanges two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); where that
    is missing, two renames with the previous directory kept until the new one is in place."""
    libc = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
        if rc == 0:
            return
    old = Path(tempfile.mkdtemp(prefix=f".{b.name}.previous-", dir=b.parent))
    os.rmdir(old)
    os.rename(b, old)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(old, b)
        raise
    os.rename(old, a)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def read_adapter(path) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """The config and tensors of adapter directory ``path`` (JSON and safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is not an adapter directory")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = f" ({', '.join(pickled)} is pickle, which lowrank never loads)" if pickled else ""
        raise AdapterFileError(f"{path}: no {WEIGHTS_NAME}{extra}")
    if not config_file.is_file():
        raise AdapterFileError(f"{path}: no {CONFIG_NAME}")
    try:
        config = AdapterConfig.from_json(config_file.read_text(encoding="utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_file}: {e}") from None
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model: nn.Module, path, adapter_name: Optional[str] = None, *, trainable: bool = False) -> str:
    """Loads the adapter in directory ``path`` (lowrank's or PEFT's) into ``model`` as ``adapter_name``
    (default ``"default"``), makes it active, and returns its name. Its parameters train only with
    ``trainable=True``.

    Every tensor is checked against the model before anything changes: a module the model lacks, a
    shape that differs, a method that does not fit the layer (full fine-tuning over a 4-bit base) or
    a tensor the format does not know raises :class:`AdapterFileError` naming it, and the model is
    left as it was."""
    name = check_adapter_name(adapter_name if adapter_name is not None else "default")
    if name in _all_adapter_names(model):
        raise ValueError(f"adapter_name: the model already has an adapter named {name!r}")
    config, tensors = read_adapter(path)
    plan = _plan(model, config, tensors, Path(path))
    layers, adapters = [], []
    projections = None
    if isinstance(config, VeRAConfig):
        given = None
        if _VERA_SHARED[0] in tensors:
            given = (tensors[_VERA_SHARED[0]], tensors[_VERA_SHARED[1]])
        projections = _vera_projections([_base(m) for _, m, _, _, _ in plan["layers"]], config, given)
    for layer_name, module, parent, attr, keys in plan["layers"]:
        try:
            adapter = _make_adapter(_base(module), config, projections)
        except ValueError as e:
            raise AdapterFileError(f"{path}: module {layer_name!r}: {e}") from None
        _fill(adapter, _base(module), keys, Path(path), layer_name)
        layers.append((layer_name, module, parent, attr))
        adapters.append(adapter)
    saved_states = plan["saved"]
    attach(model, name, config, layers, adapters, trainable=trainable)
    with torch.no_grad():
        for saved_name, saved in _saved_modules(model):
            if saved_name in saved_states and name in saved.copies:
                saved.copies[name].load_state_dict(saved_states[saved_name], strict=True)
    return name


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLinear) else module


def _plan(model: nn.Module, config: AdapterConfig, tensors: dict[str, Tensor], path: Path) -> dict:
    """Checks every tensor of the file against the model; returns what to build."""
    modules = {n: (m, p, a) for n, m, p, a in _walk(model)}
    per_layer: dict[str, dict[str, Tensor]] = {}
    saved_targets = {n: m for n, m, _, _ in _modules_to_save_targets(model, config)}
    saved: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key in _VERA_SHARED:
            if not isinstance(config, VeRAConfig):
                raise AdapterFileError(f"{path}: tensor {key!r} belongs to a VeRA adapter, the config says {config.peft_type}")
            continue
        if not key.startswith(_PREFIX):
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} (keys start with {_PREFIX!r})")
        rest = key[len(_PREFIX):]
        for suffix, method in _ADAPTER_SUFFIXES.items():
            if rest.endswith("." + suffix):
                if method != ("lora" if config.method == "qlora" else config.method):
                    raise AdapterFileError(
                        f"{path}: tensor {key!r} is a {method} tensor, but the config says {config.peft_type}"
                    )
                per_layer.setdefault(rest[: -len(suffix) - 1], {})[suffix] = t
                break
        else:
            owner = next((n for n in saved_targets if rest.startswith(n + ".")), None)
            if owner is None:
                raise AdapterFileError(f"{path}: unexpected tensor {key!r}: no adapted layer or modules_to_save owns it")
            saved.setdefault(owner, {})[rest[len(owner) + 1:]] = t
    if isinstance(config, VeRAConfig):
        missing = [k for k in _VERA_SHARED if k not in tensors]
        if missing and (config.save_projection or len(missing) == 1):
            raise AdapterFileError(f"{path}: VeRA projections {missing} are missing (the file needs both or neither)")
        for key in _VERA_SHARED if not missing else ():
            t = tensors[key]
            if t.dim() != 2 or not t.dtype.is_floating_point:
                raise AdapterFileError(f"{path}: {key}: expected a 2-D floating-point tensor, got {t.dtype} {list(t.shape)}")
            if not _finite(t):
                raise AdapterFileError(f"{path}: {key}: contains NaN or infinity")
    if not per_layer:
        raise AdapterFileError(f"{path}: the file holds no adapter tensors")
    for owner in saved_targets:  # attach would wrap one inside the other, and the copy's keys would differ
        clash = next((n for n in per_layer if n == owner or n.startswith(owner + ".") or owner.startswith(n + ".")), None)
        if clash is not None:
            raise AdapterFileError(f"{path}: modules_to_save {owner!r} overlaps the adapted layer {clash!r}")
    layers = []
    for layer_name, keys in sorted(per_layer.items()):
        if layer_name not in modules:
            raise AdapterFileError(f"{path}: module {layer_name!r} is not in {type(model).__name__}")
        module, parent, attr = modules[layer_name]
        base = _base(module)
        if base_kind(base) is None:
            raise AdapterFileError(
                f"{path}: module {layer_name!r} is a {type(base).__name__}, not a linear layer lowrank adapts"
            )
        try:
            _check_method_fits(layer_name, base, config)
        except ValueError as e:
            raise AdapterFileError(f"{path}: {e}") from None
        _check_shapes(layer_name, base, config, keys, path)
        layers.append((layer_name, module, parent, attr, keys))
    if isinstance(config, VeRAConfig) and _VERA_SHARED[0] in tensors:  # every layer slices A[:r, :in], B[:out, :r]
        max_in = max(base_features(_base(m))[0] for _, m, _, _, _ in layers)
        max_out = max(base_features(_base(m))[1] for _, m, _, _, _ in layers)
        for key, (rows, cols), want in ((_VERA_SHARED[0], tensors[_VERA_SHARED[0]].shape, f"[{config.r}, >= {max_in}]"),
                                        (_VERA_SHARED[1], tensors[_VERA_SHARED[1]].shape, f"[>= {max_out}, {config.r}]")):  # fmt: skip
            ok = (rows == config.r and cols >= max_in) if key == _VERA_SHARED[0] else (rows >= max_out and cols == config.r)
            if not ok:
                raise AdapterFileError(f"{path}: {key}: expected {want} for r={config.r} over these layers, got {[rows, cols]}")
    for owner, state in saved.items():
        expected = saved_targets[owner]
        expected = expected.original_module if hasattr(expected, "original_module") else expected
        want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            raise AdapterFileError(f"{path}: modules_to_save {owner!r}: expected tensors {want}, got {got}")
    return {"layers": layers, "saved": saved}


def _check_shapes(layer_name: str, base: nn.Module, config: AdapterConfig, keys: dict, path: Path) -> None:
    in_f, out_f = base_features(base)
    if config.method in ("lora", "qlora"):
        r = config.r
        want = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
    elif config.method == "vera":
        want = {"vera_lambda_d": (config.r,), "vera_lambda_b": (out_f,)}
    else:
        shape = tuple(base.weight.shape)
        want = {"full_delta.weight": shape}
        if getattr(base, "bias", None) is not None:
            want["full_delta.bias"] = tuple(base.bias.shape)
    if set(keys) != set(want):
        raise AdapterFileError(
            f"{path}: module {layer_name!r}: expected tensors {sorted(want)}, got {sorted(keys)}"
        )
    for key, shape in want.items():
        t = keys[key]
        if not t.dtype.is_floating_point:
            raise AdapterFileError(f"{path}: {layer_name}.{key}: expected a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise AdapterFileError(
                f"{path}: {layer_name}.{key}: expected shape {list(shape)} for this model, got {list(t.shape)}"
            )
        if not _finite(t):
            raise AdapterFileError(f"{path}: {layer_name}.{key}: contains NaN or infinity")


def _finite(t: Tensor) -> bool:
    # torch.isfinite has no kernel for some float8 dtypes: widen those (adapter tensors are small)
    return bool(torch.isfinite(t if t.dtype.itemsize > 1 else t.float()).all())


@torch.no_grad()
def _fill(adapter: nn.Module, base: nn.Module, keys: dict[str, Tensor], path: Path, layer_name: str) -> None:
    if adapter.method == "lora":
        adapter.lora_A.weight.copy_(keys["lora_A.weight"])
        adapter.lora_B.weight.copy_(keys["lora_B.weight"])
    elif adapter.method == "vera":
        adapter.vera_lambda_d.copy_(keys["vera_lambda_d"])
        adapter.vera_lambda_b.copy_(keys["vera_lambda_b"])
    else:
        adapter.weight.copy_(base.weight.float() + keys["full_delta.weight"].to(base.weight.device).float())
        if adapter.bias is not None:
            adapter.bias.copy_(base.bias.float() + keys["full_delta.bias"].to(base.bias.device).float())


__all__ = ["save_adapter", "load_adapter", "read_adapter", "adapter_state_dict", "AdapterFileError"]
