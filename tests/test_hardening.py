"""Hardening: the adapter loader fuzzed over file bytes (hypothesis), the layers and the model-level API
from several Python threads, bit-identical reruns, resident memory over 10 000 training steps, and
empty inputs (0 rows) through every layer and op.

The loader contract fuzzed here: ``lowrank.load_adapter`` either loads (the mutation kept the files
valid) or raises ``AdapterFileError`` / ``ValueError`` / ``FileNotFoundError``, and after a failed load
the model's state dict and adapter names are exactly as before. (Hand-written bad files, pickle and
interrupted saves: test_adapter_files.py.)

The CPU crossovers (fused few-token kernels vs the GEMM path) are pinned here to the built-in
defaults, so M=1 and M=16 take the fused kernels and M=300 the GEMM path on every machine, and no
test waits for calibration.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

import lowrank
from lowrank import AdapterFileError, LoRAConfig, VeRAConfig
from lowrank._proc import release_freed_memory, status_kb
from lowrank.ops import _dispatch, _runtime
from lowrank.ops import mixed as mixed_ops

from test_adapters import _ids, _model, _randomize
from test_adapter_files import _assert_unchanged, _snapshot

ALLOWED = (AdapterFileError, ValueError, FileNotFoundError)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(autouse=True)
def _pinned_crossovers(monkeypatch):
    d = _dispatch.DEFAULTS
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {torch.float32: d["cpu_fused_max_m/float32"],
                                                      torch.bfloat16: d["cpu_fused_max_m/bfloat16"]})  # fmt: skip
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_MAX_M", {torch.float32: d["cpu_input_grad_max_m/float32"],
                                                           torch.bfloat16: d["cpu_input_grad_max_m/bfloat16"]})  # fmt: skip
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", d["nf4_cpu_fused_max_m/float32"])
    monkeypatch.setattr(_runtime, "NF4_CPU_BF16_DOT", d["nf4_cpu_bf16_rows"] == "dot")
    monkeypatch.setattr(_runtime, "CPU_LORA_BF16_DOT", d["cpu_lora_bf16_rows"] == "dot")
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_BF16_DOT", d["cpu_input_grad_bf16_rows"] == "dot")
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", d["nf4_cpu_input_grad_bf16_dot_from_m"])
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", {torch.float32: d["nf4_cpu_input_grad_max_m/float32"],
                                                               torch.bfloat16: d["nf4_cpu_input_grad_max_m/bfloat16"]})  # fmt: skip


# =============================================================================================
# 1. The loader, fuzzed over file bytes
# =============================================================================================
SOURCES = {
    # LoRA with a modules_to_save copy (so mutations reach that path too), VeRA with its projections
    "lora": LoRAConfig(r=2, alpha=5, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]),
    "vera": VeRAConfig(r=4, save_projection=True),
}


class _Files(tuple):
    """(weights bytes, config bytes), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<adapter files: {len(self[0])} + {len(self[1])} bytes>"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """``{kind: (weights bytes, config bytes)}`` of small real adapters."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for kind, config in SOURCES.items():
        model = lowrank.inject(_model(), config)
        _randomize(model)
        path = lowrank.save_adapter(model, root / kind)
        out[kind] = _Files(((path / WEIGHTS).read_bytes(), (path / CONFIG).read_bytes()))
    return out


@pytest.fixture(scope="module")
def pristine():
    """The model every fuzzed file loads into: it already holds an adapter (and a modules_to_save copy)."""
    return lowrank.inject(_model(), LoRAConfig(r=3, target_modules=["q_proj"], modules_to_save=["embed"]),
                          adapter_name="present")  # fmt: skip


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _try_load(pristine, scratch: Path, weights: bytes, config: bytes) -> bool:
    """Loads the two files into a copy of ``pristine``; checks the contract; True when it loaded."""
    model = copy.deepcopy(pristine)
    names = lowrank.adapter_names(model)
    before = _snapshot(model)
    d = Path(tempfile.mkdtemp(dir=scratch))
    try:
        (d / WEIGHTS).write_bytes(weights)
        (d / CONFIG).write_bytes(config)
        try:
            lowrank.load_adapter(model, d, "new")
        except ALLOWED as e:
            _assert_unchanged(model, before, names)
            if currently_in_test_context():
                event(f"rejected: {type(e).__name__}: {_reason(str(e), d)}")
            return False
        assert sorted(os.listdir(d)) == [CONFIG, WEIGHTS]  # loading never writes
    finally:
        shutil.rmtree(d)
    if currently_in_test_context():
        event("loaded")
    assert lowrank.adapter_names(model) == names + ["new"]
    assert lowrank.active_adapter(model) == "new"
    with torch.no_grad():
        assert model(_ids()).shape == (3, 5, 37)
    return True


def _reason(message: str, d: Path) -> str:
    """The kind of a rejection, for hypothesis' statistics (``--hypothesis-show-statistics``)."""
    message = message.replace(str(d / WEIGHTS), "W").replace(str(d / CONFIG), "C").replace(str(d), "D")
    for marker in ("not a readable safetensors", "unexpected tensor", "expected shape", "expected tensors", "is not in",
                   "floating-point", "NaN", "projections", "peft_type", "must be", "not valid JSON", "nested too deeply",
                   "is a lora tensor", "is a vera tensor", "modules_to_save"):  # fmt: skip
        if marker in message:
            return marker
    return message[:40]


def _header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


_HUGE = [2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**64 - 1, 2**64]
_json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([-1, 0, 1, 2, 3, 4, *_HUGE, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["LORA", "VERA", "LOWRANK_FULL", "IA3", "lora", "vera", "qlora", "full", "all-linear",
                     "q_proj", "(", ".*", "none", "all", "float32", "bfloat16", "int8"]),
)  # fmt: skip
json_values = st.recursive(
    _json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_CONFIG_KEYS = ["peft_type", "method", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                "exclude_modules", "modules_to_save", "bias", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
                "d_initial", "vera_dropout", "projection_prng_key", "save_projection", "fan_in_fan_out",
                "blocksize", "compute_dtype", "adapter_dtype", "quantize_base", "task_type"]  # fmt: skip
_DTYPES = ["F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL",
           "C64", "F4", "XYZ", "", "f32"]  # fmt: skip
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4, "I64": 8, "U8": 1,
          "I16": 2, "BOOL": 1}


_NAMES = ["../../../etc/passwd", "base_model.model.../../x.lora_A.weight", "base_model.model.layers.0.q_proj/../..",
          "base_model.model..lora_A.weight", "base_model.model.layers.0.q_proj.lora_A.weight",
          "base_model.model.layers.9.q_proj.lora_B.weight", "base_model.vera_A", "base_model.vera_B",
          "base_model.model.lm_head.weight", "base_model.model.embed.weight", "", "\x00", "é/漢字", "__metadata__"]  # fmt: skip


@st.composite
def _header_edit(draw, data: bytes) -> bytes:
    """A structured edit of the safetensors JSON header (dtype, shape, offsets, names), re-serialized
    with a consistent length prefix."""
    header, body = _header(data)
    keys = sorted(header)
    key = draw(st.sampled_from(keys))
    what = draw(st.sampled_from(["retype", "reshape", "rename"] * 3 + ["dtype", "shape", "offsets", "delete",
                                                                       "duplicate", "value", "metadata", "body"]))  # fmt: skip
    entry = header[key]
    well_formed = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and all(
        isinstance(d, int) for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list) and len(
        entry["data_offsets"]) == 2 and all(isinstance(o, int) for o in entry["data_offsets"])  # fmt: skip
    if what in ("dtype", "retype", "shape", "reshape", "offsets", "duplicate") and not well_formed:
        what = "value"  # an earlier edit left no tensor entry to edit
    if key == "__metadata__" or what == "metadata":
        header["__metadata__"] = draw(json_values)
    elif what == "retype":  # another dtype, the shape rescaled so the byte count still matches the offsets
        dtype, size = draw(st.sampled_from(list(_SIZES.items())))
        shape, total = entry["shape"], entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["dtype"], count, lead = dtype, total // size, math.prod(shape[:-1])
        entry["shape"] = [*shape[:-1], count // lead] if shape and lead and count % lead == 0 else [count]
    elif what == "reshape":  # the same element count, another shape
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([[math.prod(shape)], [1, *shape], [*shape, 1], shape[::-1], [],
                                               [math.prod(shape), 1]]))  # fmt: skip
    elif what == "dtype":
        entry["dtype"] = draw(st.sampled_from(_DTYPES) | json_values)
    elif what == "shape":
        entry["shape"] = draw(st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 24, 40, *_HUGE]) | st.integers(), max_size=4)
                              | json_values)  # fmt: skip
    elif what == "offsets":
        ints = st.sampled_from([0, 1, 4, len(body) - 1, len(body), len(body) + 1, *_HUGE]) | st.integers(-5, len(body) + 8)
        entry["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3) | json_values)
    elif what == "rename":
        header[draw(st.sampled_from(_NAMES) | st.text(max_size=30))] = header.pop(key)
    elif what == "delete":
        del header[key]
    elif what == "duplicate":
        header[draw(st.sampled_from(_NAMES))] = copy.deepcopy(entry)
    elif what == "value":
        header[key] = draw(json_values)
    else:  # a body shorter or longer than the offsets say
        body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body + draw(st.binary(max_size=64))
    return _with_header(header, body, pad=draw(st.booleans()))


_TENSOR_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32,
                  torch.int8, torch.uint8, torch.bool]  # fmt: skip


def _extreme_values(dtype: torch.dtype) -> list:
    """Values a hostile file may hold in a tensor of ``dtype`` (a file may carry a tensor whose dtype an
    earlier mutation changed): NaN, infinities, the largest finite value, signed zeros and the smallest
    denormal for float dtypes; the extremes for integer ones. (Storing 3e38 into an fp16 or an integer
    tensor raises in torch itself, which is the strategy failing, not the loader.)"""
    if dtype == torch.bool:
        return [True, False]
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return [info.min, info.max, 0]
    big = min(3e38, torch.finfo(dtype).max)
    special = [float("nan"), float("inf"), -float("inf")] if dtype != torch.float8_e4m3fn else [float("nan")]
    return special + [big, -big, 0.0, -0.0, 1e-45]


@st.composite
def _tensor_edit(draw, data: bytes) -> bytes:
    """A well-formed file with one tensor changed: dtype, shape, values (NaN, inf, huge), name, or gone."""
    tensors = load_bytes(data)
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    what = draw(st.sampled_from(["dtype", "flatten", "unsqueeze", "transpose", "slice", "scalar", "values", "rename",
                                 "drop", "add"]))  # fmt: skip
    if what == "dtype":
        tensors[key] = t.to(draw(st.sampled_from(_TENSOR_DTYPES)))
    elif what == "flatten":
        tensors[key] = t.flatten().contiguous()
    elif what == "unsqueeze":
        tensors[key] = t.unsqueeze(draw(st.integers(0, t.dim()))).contiguous()
    elif what == "transpose" and t.dim() == 2:
        tensors[key] = t.t().contiguous()
    elif what == "slice" and t.numel():
        tensors[key] = t.flatten()[: draw(st.integers(0, t.numel() - 1))].reshape(-1).contiguous()
    elif what == "scalar":
        tensors[key] = torch.tensor(draw(st.floats(allow_nan=True, allow_infinity=True)))
    elif what == "values" and t.numel():
        flat = t.flatten().clone()
        flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(_extreme_values(flat.dtype)))
        tensors[key] = flat.reshape(t.shape)
    elif what == "rename":
        tensors[draw(st.sampled_from(_NAMES) | st.text(min_size=1, max_size=30))] = tensors.pop(key)
    elif what == "drop":
        del tensors[key]
    elif what == "add":
        tensors[draw(st.sampled_from(_NAMES[:-1]) | st.text(min_size=1, max_size=30))] = t.clone()
    return save_bytes(tensors, metadata=draw(st.sampled_from([None, {"format": "pt"}])))


@st.composite
def weights_mutation(draw, data: bytes) -> bytes:
    """1-3 mutations of a safetensors file: byte flips (anywhere or in the header), truncation,
    extension, a rewritten 8-byte header length, or a structured header edit."""
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["flip_data", "flip_data", "flip_header", "truncate", "extend", "header_len"]
                                    + ["header_edit"] * 4 + ["tensor_edit"] * 4))  # fmt: skip
        if not data:
            kind = "extend"
        n = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
        if kind in ("flip_data", "flip_header"):
            lo, hi = (0, min(len(data), 8 + n)) if kind == "flip_header" else (min(len(data), 8 + n), len(data))
            lo = lo if lo < hi else 0
            buf = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(lo, max(lo, hi - 1)))] ^= draw(st.integers(1, 255))
            data = bytes(buf)
        elif kind == "truncate":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        elif kind == "extend":
            data = data + draw(st.binary(min_size=1, max_size=64))
        elif kind == "header_len":
            value = draw(st.sampled_from([0, 1, 2, 7, 8, n - 1, n + 1, n + 8, len(data) - 8, len(data), *_HUGE[:-1]])
                         | st.integers(0, 2**64 - 1))  # fmt: skip
            data = (value % 2**64).to_bytes(8, "little") + data[8:]
        elif kind == "tensor_edit":
            try:
                load_bytes(data)
            except Exception:
                continue  # an earlier mutation broke the file: no tensors to edit
            data = draw(_tensor_edit(data))
        else:
            try:
                _header(data)
            except (ValueError, UnicodeDecodeError):
                continue  # an earlier mutation broke the header: nothing structured to edit
            data = draw(_header_edit(data))
    return data


@st.composite
def config_mutation(draw, data: bytes) -> bytes:
    """A mutated ``adapter_config.json``: fields set to random JSON values or deleted, an unknown
    peft_type, random JSON documents, deep nesting, or garbage bytes."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "peft_type", "document", "nested", "garbage", "flip"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "document":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"r":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        return bytes(buf)
    config = json.loads(data)
    if kind == "peft_type":
        config["peft_type"] = draw(st.sampled_from(["IA3", "LOHA", "lora", "", "LORA ", "VERA", "LOWRANK_FULL"])
                                   | json_values)  # fmt: skip
    else:
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(_CONFIG_KEYS + sorted(config)))
            if draw(st.integers(0, 3)) == 0:
                config.pop(key, None)
            else:
                config[key] = draw(json_values)
    return json.dumps(config).encode()


_FUZZ = settings(max_examples=200, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])  # fmt: skip


@pytest.mark.parametrize("kind", list(SOURCES))
@_FUZZ
@given(data=st.data())
def test_fuzz_weights_file(sources, pristine, scratch, kind, data):
    weights, config = sources[kind]
    _try_load(pristine, scratch, data.draw(weights_mutation(weights)), config)


@pytest.mark.parametrize("kind", list(SOURCES))
@_FUZZ
@given(data=st.data())
def test_fuzz_config_file(sources, pristine, scratch, kind, data):
    weights, config = sources[kind]
    _try_load(pristine, scratch, weights, data.draw(config_mutation(config)))


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_fuzz_both_files(sources, pristine, scratch, data):
    weights, config = sources[data.draw(st.sampled_from(sorted(SOURCES)))]
    _try_load(pristine, scratch, data.draw(weights_mutation(weights)), data.draw(config_mutation(config)))


def test_unmutated_sources_load(sources, pristine, scratch):
    for weights, config in sources.values():  # the fuzzers start from files that load
        assert _try_load(pristine, scratch, weights, config)


# ---- named cases ------------------------------------------------------------------------------
def _lora_tensors(sources) -> tuple[dict, dict]:
    weights, config = sources["lora"]
    return load_bytes(weights), json.loads(config)


def _files(tensors: dict, config: dict) -> tuple[bytes, bytes]:
    return save_bytes(tensors), json.dumps(config).encode()


ESCAPING_NAMES = [
    "../adapter_model.safetensors",
    "../../../../etc/passwd",
    "/etc/passwd",
    "base_model.model.../../../etc/passwd.lora_A.weight",
    "base_model.model.layers.0/../../q_proj.lora_A.weight",
    "base_model.model.layers.0.q_proj.lora_A.weight/../../x",
    "base_model.model..lora_A.weight",
    "base_model.model.layers.0.q_proj\x00.lora_A.weight",
    "base_model.model.lm_head/../embed.weight",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_escaping_tensor_names_are_rejected(sources, pristine, tmp_path, name):
    tensors, config = _lora_tensors(sources)
    key = "base_model.model.layers.0.q_proj.lora_A.weight"
    for variant in ({**tensors, name: torch.ones(2, 24)}, {**{k: v for k, v in tensors.items() if k != key}, name: tensors[key]}):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert not _try_load(pristine, tmp_path, *_files(variant, config))
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_header_declaring_more_bytes_than_the_file(sources, pristine, scratch):
    weights, config = sources["lora"]
    n = int.from_bytes(weights[:8], "little")
    for length in (len(weights), len(weights) - 7, 2**40, 2**64 - 1):  # the 8-byte header length
        assert not _try_load(pristine, scratch, length.to_bytes(8, "little") + weights[8:], config)
    assert not _try_load(pristine, scratch, weights[:-1], config)  # the last tensor one byte short
    assert not _try_load(pristine, scratch, weights[: 8 + n], config)  # a header and no data
    header, body = _header(weights)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[key]["shape"] = [header[key]["shape"][0] * 1000, header[key]["shape"][1]]  # shape beyond the offsets
    assert not _try_load(pristine, scratch, _with_header(header, body), config)


# ---- regressions: bugs these fuzzers found (each raised a stray exception type or changed the model)
def test_deeply_nested_config_json_is_an_adapter_file_error(sources, pristine, scratch):
    weights, _ = sources["lora"]  # json.loads raised RecursionError
    assert not _try_load(pristine, scratch, weights, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        lowrank.AdapterConfig.from_json('{"r":' * 100_000 + "1" + "}" * 100_000)


@pytest.mark.parametrize("case", ["only A, save_projection false", "only B", "A is 1-D", "B is 0-D", "A is 3-D",
                                  "A is int", "A has NaN", "B has inf", "A is float8", "B has fewer columns than r",
                                  "A has more rows than r", "A narrower than a layer"])  # fmt: skip
def test_bad_vera_projections_are_adapter_file_errors(sources, pristine, scratch, case):
    weights, config = sources["vera"]  # KeyError / IndexError / TypeError before
    tensors, config = load_bytes(weights), json.loads(config)
    a, b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    edits = {
        "only A, save_projection false": lambda: (tensors.pop("base_model.vera_B"), config.update(save_projection=False)),
        "only B": lambda: tensors.pop("base_model.vera_A"),
        "A is 1-D": lambda: tensors.update({"base_model.vera_A": a.flatten().contiguous()}),
        "B is 0-D": lambda: tensors.update({"base_model.vera_B": torch.tensor(1.0)}),
        "A is 3-D": lambda: tensors.update({"base_model.vera_A": a[None].contiguous()}),
        "A is int": lambda: tensors.update({"base_model.vera_A": a.to(torch.int32)}),
        "A has NaN": lambda: tensors.update({"base_model.vera_A": torch.full_like(a, float("nan"))}),
        "B has inf": lambda: tensors.update({"base_model.vera_B": torch.full_like(b, float("inf"))}),
        "A is float8": lambda: tensors.update({"base_model.vera_A": torch.full_like(a, float("nan")).to(torch.float8_e5m2)}),
        # found by test_fuzz_weights_file: B [max_out, 2] for r=4 loaded, then the first forward raised
        "B has fewer columns than r": lambda: tensors.update({"base_model.vera_B": b[:, :2].double().contiguous()}),
        "A has more rows than r": lambda: tensors.update({"base_model.vera_A": torch.cat([a, a]).contiguous()}),
        "A narrower than a layer": lambda: tensors.update({"base_model.vera_A": a[:, :-1].contiguous()}),
    }
    edits[case]()
    assert not _try_load(pristine, scratch, *_files(tensors, config))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_adapter_tensors(sources, pristine, scratch, dtype):
    tensors, config = _lora_tensors(sources)  # torch.isfinite raised NotImplementedError for float8_e4m3fn
    assert _try_load(pristine, scratch, *_files({k: v.to(dtype) for k, v in tensors.items()}, config))
    key = "base_model.model.layers.0.q_proj.lora_B.weight"
    nan = {**tensors, key: torch.full_like(tensors[key], float("nan")).to(dtype)}
    assert not _try_load(pristine, scratch, *_files(nan, config))


@pytest.mark.parametrize("saved_module", ["layers.0.q_proj", "layers.0"])
def test_modules_to_save_overlapping_an_adapted_layer_is_rejected(sources, pristine, scratch, saved_module):
    # load_state_dict raised RuntimeError after the adapter was attached: the model was changed.
    tensors, config = _lora_tensors(sources)
    tensors = {k: v for k, v in tensors.items() if "lm_head" not in k}
    original = _model().get_submodule(saved_module)
    tensors.update({f"base_model.model.{saved_module}.{k}": v.clone() for k, v in original.state_dict().items()})
    config["modules_to_save"] = [saved_module]
    assert not _try_load(_model(), scratch, *_files(tensors, config))  # a model without adapters yet
    assert not _try_load(pristine, scratch, *_files(tensors, config))


# =============================================================================================
# Layers used by the thread-safety, determinism, leak and empty-input tests
# =============================================================================================
def _layer(kind: str, dtype=torch.float32, in_f: int = 64, out_f: int = 96) -> torch.nn.Module:
    torch.manual_seed(1234)
    if kind == "lora":
        layer = lowrank.LoRALinear(in_f, out_f, r=8, alpha=16, dtype=dtype)
    elif kind == "vera":
        layer = lowrank.VeRALinear(in_f, out_f, r=16, dtype=dtype)
    elif kind == "qlora":
        layer = lowrank.QLoRALinear(in_f, out_f, r=8, alpha=16, dtype=dtype)
    elif kind == "vera-nf4":  # VeRA over a 4-bit base (the base layer is called as a module)
        layer = lowrank.VeRALinear.from_linear(lowrank.NF4Linear(in_f, out_f, dtype=dtype), r=16)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # a non-trivial adapter (a fresh one is the identity)
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1 + (0.5 if p.dim() == 1 else 0.0))
    return layer


LAYERS = ["lora", "vera", "qlora", "vera-nf4"]


def _step(layer, x: torch.Tensor, g: torch.Tensor):
    """Forward + backward of ``<layer(x), g>``: (y, dx, d(adapter params)...), no shared ``.grad``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], grad_outputs=g)
    return (y.detach(), *grads)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# =============================================================================================
# 2. Thread safety
# =============================================================================================
@pytest.mark.parametrize("kind", LAYERS)
def test_shared_layer_from_many_threads_matches_serial(kind):
    layer = _layer(kind)
    gen = torch.Generator().manual_seed(7)
    shapes = [(1, 64), (16, 64), (300, 64), (3, 5, 64), (17, 64), (65, 64), (2, 64), (8, 64)] * 2
    jobs = [(torch.randn(*s, generator=gen), torch.randn(*s[:-1], 96, generator=gen)) for s in shapes]
    serial = [_step(layer, x, g) for x, g in jobs]
    with torch.no_grad():
        serial_inference = [layer(x) for x, _ in jobs]

    def inference(x):
        with torch.no_grad():
            return layer(x)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            parallel = list(pool.map(lambda job: _step(layer, *job), jobs))
            assert all(_same(s, p) for s, p in zip(serial, parallel))
            parallel_inference = list(pool.map(inference, [x for x, _ in jobs]))
            assert all(torch.equal(s, p) for s, p in zip(serial_inference, parallel_inference))


def _two_adapter_model():
    model = lowrank.inject(_model(), LoRAConfig(r=4, alpha=8, modules_to_save=["lm_head"]), adapter_name="a")
    lowrank.inject(model, VeRAConfig(r=8), adapter_name="b")
    _randomize(model, "a")
    _randomize(model, "b")
    return model


def test_injected_model_forwards_from_many_threads_match_serial():
    model = _two_adapter_model()
    jobs = [_ids(seed, shape) for seed, shape in enumerate([(3, 5), (1, 1), (2, 40), (1, 300), (4, 7), (1, 3)] * 2)]
    for active in ("a", "b"):
        lowrank.set_adapter(model, active)
        with torch.no_grad():
            serial = [model(ids) for ids in jobs]
        params = [p for _, p in lowrank.adapter_parameters(model, active)]

        def train_step(ids):
            out = model(ids)
            return (out.detach(), *torch.autograd.grad(out.square().mean(), params))

        serial_train = [train_step(ids) for ids in jobs]

        def inference(ids):
            with torch.no_grad():
                return model(ids)

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(inference, jobs))
            parallel_train = list(pool.map(train_step, jobs))
        assert all(torch.equal(s, p) for s, p in zip(serial, parallel))
        assert all(_same(s, p) for s, p in zip(serial_train, parallel_train))


def test_model_api_from_many_threads(tmp_path):
    """Saves, loads, reads and summaries from several threads; concurrent set_adapter + forward need
    not be coherent, but must not fail."""
    model = _two_adapter_model()
    lowrank.set_adapter(model, "b")
    with torch.no_grad():
        expected_b = model(_ids())
    lowrank.set_adapter(model, "a")
    with torch.no_grad():
        expected = model(_ids())

    def save(i):
        return lowrank.save_adapter(model, tmp_path / f"s{i}", adapter_name="ab"[i % 2])

    bases = [_model() for _ in range(8)]  # serially: _model() seeds torch's global generator

    def load(i):
        fresh = bases[i]
        lowrank.load_adapter(fresh, tmp_path / "s0")
        with torch.no_grad():
            return fresh(_ids())

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(save, range(8)))
        assert all(sorted(os.listdir(p)) == [CONFIG, WEIGHTS] for p in paths)
        loaded = list(pool.map(load, range(8)))
        assert all(torch.equal(out, expected) for out in loaded)
        # concurrent saves over one existing adapter directory: the survivor is one whole adapter
        list(pool.map(lambda i: lowrank.save_adapter(model, tmp_path / "s0", adapter_name="ab"[i % 2]), range(8)))
        assert sorted(os.listdir(tmp_path / "s0")) == [CONFIG, WEIGHTS]
        assert sorted(os.listdir(tmp_path)) == sorted(f"s{i}" for i in range(8))  # no staging left behind
        fresh = _model()
        lowrank.load_adapter(fresh, tmp_path / "s0")
        with torch.no_grad():
            survivor = fresh(_ids())
        assert torch.equal(survivor, expected) or torch.equal(survivor, expected_b)  # one adapter, whole
        reads = list(pool.map(lambda _: (lowrank.adapter_state_dict(model, "a"), str(lowrank.trainable_summary(model))),
                              range(8)))  # fmt: skip
        assert all(_same(list(r[0].values()), list(reads[0][0].values())) and r[1] == reads[0][1] for r in reads)

        stop = threading.Event()

        def switch():
            i = 0
            while not stop.is_set():
                lowrank.set_adapter(model, "ab"[i % 2])
                i += 1

        switcher = pool.submit(switch)
        try:
            with torch.no_grad():
                outs = list(pool.map(lambda s: model(_ids(s)), range(30)))
        finally:
            stop.set()
        switcher.result()
        assert all(o.shape == (3, 5, 37) and torch.isfinite(o).all() for o in outs)
    lowrank.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(_ids()), expected)


# =============================================================================================
# 3. Determinism: the same inputs and thread count give the same bits, run to run
# =============================================================================================
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", LAYERS)
def test_forward_backward_bit_identical_run_to_run(kind, dtype, m):
    layer = _layer(kind, dtype, in_f=136, out_f=200)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 136, generator=gen).to(dtype)
    g = torch.randn(m, 200, generator=gen).to(dtype)
    first = _step(layer, x, g)
    assert first[0].dtype == dtype and all(torch.isfinite(t.float()).all() for t in first)
    for _ in range(2):
        assert _same(first, _step(layer, x, g))
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


# =============================================================================================
# 4. Resident memory stays flat over many training steps
# =============================================================================================
def _rss_bytes() -> int:
    release_freed_memory()
    kb = status_kb("VmRSS")
    assert kb is not None, "no VmRSS in /proc/self/status"
    return kb * 1024


# Measured growth after the warm-up: 16-140 KiB per layer, flat from the first 2000 calls on. A leak of
# one 4 x 96 fp32 output per call would be ~15 MiB.
LEAK_CALLS, LEAK_WARMUP, LEAK_BOUND = 10_000, 500, 4 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_training_steps_leave_resident_memory_flat():
    """10 000 forward+backward calls per layer (64 -> 96, M=4). One intra-op thread: on a busy 2-core
    machine a two-thread region waits a scheduler slice per call (~10x slower), and leaks do not
    depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kinds = ["lora", "vera", "qlora"]
        layers = [_layer(kind) for kind in kinds]
        x, g = torch.randn(4, 64), torch.randn(4, 96)
        growth = {}
        for kind, layer in zip(kinds, layers):
            for _ in range(LEAK_WARMUP):
                _step(layer, x, g)
            before = _rss_bytes()
            for i in range(LEAK_CALLS):
                if i % 2:
                    _step(layer, x, g)
                else:  # also through .backward() into .grad, and (every 10th call) inference
                    layer(x.requires_grad_(True)).backward(g)
                    layer.zero_grad(set_to_none=True)
                    x = x.detach()
                    if i % 10 == 0:
                        with torch.no_grad():
                            layer(x)
            growth[kind] = _rss_bytes() - before
    finally:
        torch.set_num_threads(threads)
    assert all(v < LEAK_BOUND for v in growth.values()), {k: f"{v / 2**20:.2f} MiB" for k, v in growth.items()}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["lora", "vera", "qlora"])
def test_cuda_training_steps_leave_allocated_memory_flat(kind):
    """The allocator's own count: after warm-up, 2000 forward+backward calls allocate nothing that stays."""
    layer = _layer(kind).cuda()
    x, g = torch.randn(4, 64, device="cuda"), torch.randn(4, 96, device="cuda")
    for _ in range(50):
        _step(layer, x, g)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2000):
        _step(layer, x, g)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.max_memory_allocated() - before < 1 << 20  # one step's temporaries, nothing piling up


# =============================================================================================
# 5. Empty inputs: 0 rows in, an empty result of the right shape out; backward works
# =============================================================================================
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0xK", "2x0xK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", LAYERS)
def test_layers_accept_empty_inputs(kind, dtype, lead):
    layer = _layer(kind, dtype)
    x = torch.randn(*lead, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 96) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    with torch.no_grad():
        assert layer(x).shape == (*lead, 96)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0xK", "2x0xK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_accept_empty_inputs(dtype, lead):
    k, n, r = 64, 96, 4
    x = torch.randn(*lead, k, dtype=dtype)
    w, bias = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    a, b = torch.randn(r, k, dtype=dtype), torch.randn(n, r, dtype=dtype)
    ops = torch.ops.lowrank
    y, u = ops.lora_linear_forward(x, w, bias, a, b, 2.0, None)
    assert y.shape == (*lead, n) and u.shape[-1] == r and u.numel() == 0
    y, h = ops.vera_linear_forward(x, w, bias, a, b, torch.rand(r, dtype=dtype), torch.rand(n, dtype=dtype), None)
    assert y.shape == (*lead, n) and h.numel() == 0
    q = lowrank.quantize_nf4(w)
    y, u = ops.nf4_linear_forward(x, q["codes"], q["absmax"], q["absmax2"], q["code2"], q["offset"], [n, k], 64, 256,
                                  bias, a, b, 2.0, None)  # fmt: skip
    assert y.shape == (*lead, n) and u.numel() == 0
    gy = torch.randn(0, n, dtype=dtype)
    gu = torch.randn(0, r)
    assert ops.lora_linear_backward_input(gy, w, gu, a).shape == (0, k)
    assert ops.nf4_linear_backward_input(gy, q["codes"], q["absmax"], q["absmax2"], q["code2"], q["offset"], [n, k],
                                         64, 256, gu, a).shape == (0, k)  # fmt: skip
    ga, gb, gg = ops.lora_linear_backward_adapter(gy, torch.randn(0, k, dtype=dtype), gu, a, b, 2.0)
    assert ga.shape == a.shape and gb.shape == b.shape and not ga.any() and not gb.any() and gg.shape == (0, r)
    if len(lead) == 1:  # the mixed op plans rows of a 2-D batch
        order, offsets = mixed_ops.plan_rows(torch.empty(0, dtype=torch.int64), 2)
        y, h = ops.mixed_linear_forward(x, w, bias, None, order, offsets, [a, a], [b, b], [None, None], [None, None],
                                        [1.0, 0.5], None)  # fmt: skip
        assert y.shape == (0, n) and h.shape[0] == 0
