"""Adapter files: save/load round trips for every method, atomic saves, no pickle, and loads that
fail cleanly (a clear error naming the module, the model exactly as before)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank
from lowrank import AdapterFileError, FullConfig, LoRAConfig, QLoRAConfig, VeRAConfig
from lowrank.adapters import files as files_mod

from test_adapters import _ids, _model, _randomize


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot, names) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in state.items():
        assert torch.equal(v, snapshot[k]), k
    assert lowrank.adapter_names(model) == names


CONFIGS = [
    pytest.param(LoRAConfig(r=4, alpha=8), id="lora"),
    pytest.param(LoRAConfig(r=3, alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"],
                            modules_to_save=["lm_head"]), id="lora-modules_to_save"),  # fmt: skip
    pytest.param(VeRAConfig(r=8), id="vera"),
    pytest.param(VeRAConfig(r=8, save_projection=False, projection_prng_key=3), id="vera-no-projection"),
    pytest.param(FullConfig(modules_to_save=["embed"]), id="full"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip(tmp_path, config):
    model = lowrank.inject(_model(), config, adapter_name="mine")
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    path = lowrank.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"]  # no staging directory left behind
    fresh = _model()
    assert lowrank.load_adapter(fresh, path) == "default"
    assert lowrank.active_adapter(fresh) == "default"
    assert not any(p.requires_grad for _, p in lowrank.adapter_parameters(fresh))  # inference by default
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    # and into the same model, next to the adapter it came from, trainable
    lowrank.load_adapter(model, path, "again", trainable=True)
    assert all(p.requires_grad for _, p in lowrank.adapter_parameters(model, "again"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_file_keys_are_peft_keys(tmp_path):
    model = lowrank.inject(_model(), LoRAConfig(r=2, target_modules=["q_proj"]))
    lowrank.save_adapter(model, tmp_path / "a")
    keys = sorted(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == [f"base_model.model.layers.{i}.q_proj.lora_{f}.weight" for i in (0, 1) for f in "AB"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj"]
    vera = lowrank.inject(_model(), VeRAConfig(r=4, target_modules=["up_proj"]))
    lowrank.save_adapter(vera, tmp_path / "v")
    tensors = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (4, 24) and tensors["base_model.vera_B"].shape == (40, 4)
    assert tensors["base_model.model.layers.1.up_proj.vera_lambda_b"].shape == (40,)


def test_qlora_adapter_is_a_lora_file_over_a_4bit_base(tmp_path):
    model = lowrank.inject(_model(d=64, hidden=128), QLoRAConfig(r=4))
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    lowrank.save_adapter(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    fresh = lowrank.quantize_model(_model(d=64, hidden=128))  # the same quantization of the same base
    lowrank.load_adapter(fresh, tmp_path / "q")
    assert all(layer.kind == "nf4" for _, layer in lowrank.adapted_layers(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)


def test_save_names_and_errors(tmp_path):
    model = lowrank.inject(_model(), LoRAConfig(r=2), adapter_name="a")
    lowrank.inject(model, VeRAConfig(r=2), adapter_name="b")
    lowrank.save_adapter(model, tmp_path / "a", adapter_name="a")
    lowrank.save_adapter(model, tmp_path / "b")  # the active one
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "VERA"
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        lowrank.save_adapter(model, tmp_path / "c", adapter_name="c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        lowrank.save_adapter(model, tmp_path / "file")


# ---------------------------------------------------------------------------------------------
# Atomic saves
# ---------------------------------------------------------------------------------------------
def _saved_bytes(path: Path) -> dict:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("where", ["weights", "config", "swap"])
def test_interrupted_save_leaves_previous_adapter_intact(tmp_path, monkeypatch, where):
    model = lowrank.inject(_model(), LoRAConfig(r=2))
    _randomize(model)
    path = lowrank.save_adapter(model, tmp_path / "adapter")
    before = _saved_bytes(path)
    _randomize(model, std=0.5)  # the next save would write different bytes

    class Crash(RuntimeError):
        pass

    if where == "weights":
        def failing_save(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise Crash("disk full")
        monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    elif where == "config":
        monkeypatch.setattr(files_mod.json, "dump", lambda *a, **k: (_ for _ in ()).throw(Crash("killed")))
    else:
        monkeypatch.setattr(files_mod, "_swap_directories", lambda a, b: (_ for _ in ()).throw(Crash("killed")))
    with pytest.raises(Crash):
        lowrank.save_adapter(model, path)
    assert _saved_bytes(path) == before
    assert os.listdir(tmp_path) == ["adapter"]
    fresh = _model()
    lowrank.load_adapter(fresh, path)  # still loads


def test_swap_fallback_without_renameat2(tmp_path, monkeypatch):
    model = lowrank.inject(_model(), LoRAConfig(r=2))
    path = lowrank.save_adapter(model, tmp_path / "adapter")
    _randomize(model)
    monkeypatch.setattr(files_mod.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    lowrank.save_adapter(model, path)
    fresh = _model()
    lowrank.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_racing_another_save_to_the_same_new_path(tmp_path, monkeypatch):
    """Two saves to one path that does not exist yet: both find it missing, the other one creates it
    first. This save then replaces that adapter as a whole (last writer wins), leaving one complete
    adapter and no staging directory, instead of failing on the occupied name."""
    model = lowrank.inject(_model(), LoRAConfig(r=2), adapter_name="a")
    lowrank.inject(model, LoRAConfig(r=3), adapter_name="b")
    _randomize(model)
    target = tmp_path / "new"
    real_rename, raced = os.rename, []

    def rename(src, dst):
        if Path(dst) == target and not raced:
            raced.append(True)
            lowrank.save_adapter(model, target, adapter_name="b")  # the other process gets there first
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    lowrank.save_adapter(model, target, adapter_name="a")
    assert raced and os.listdir(tmp_path) == ["new"]
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 2  # this save's adapter
    fresh = _model()
    lowrank.load_adapter(fresh, target)
    lowrank.set_adapter(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Loads that must fail cleanly
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = lowrank.inject(_model(), LoRAConfig(r=2))
    _randomize(model)
    return lowrank.save_adapter(model, tmp_path / "good")


def _edit(saved: Path, tmp_path: Path, *, tensors=None, config=None, raw_weights=None, raw_config=None) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    t = load_file(saved / "adapter_model.safetensors")
    c = json.loads((saved / "adapter_config.json").read_text())
    if tensors:
        t = tensors(t)
    if config:
        c = config(c)
    if raw_weights is not None:
        (out / "adapter_model.safetensors").write_bytes(raw_weights)
    else:
        save_file(t, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(c))
    return out


def _rename(t: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in t.items()}


BAD_FILES = {
    "missing module": (dict(tensors=lambda t: _rename(t, "layers.1.", "layers.7.")), r"module 'layers\.7\.\w+' is not in Tiny"),
    "wrong shape": (dict(tensors=lambda t: {k: (v[:, :-1].contiguous() if "0.up_proj.lora_A" in k else v) for k, v in t.items()}),
                    r"layers\.0\.up_proj\.lora_A\.weight: expected shape \[2, 24\].*got \[2, 23\]"),
    "rank differs from config": (dict(config=lambda c: {**c, "r": 3}), r"lora_A\.weight: expected shape \[3, \d+\] for this model, got \[2, \d+\]"),
    "wrong method": (dict(config=lambda c: {**c, "peft_type": "VERA"}), r"is a lora tensor, but the config says VERA"),
    "unknown method": (dict(config=lambda c: {**c, "peft_type": "IA3"}), r"peft_type 'IA3' is not supported"),
    "missing factor": (dict(tensors=lambda t: {k: v for k, v in t.items() if "1.q_proj.lora_B" not in k}),
                       r"layers\.1\.q_proj': expected tensors \['lora_A\.weight', 'lora_B\.weight'\]"),
    "extra tensor": (dict(tensors=lambda t: {**t, "base_model.model.layers.0.q_proj.extra": torch.ones(2)}),
                     r"unexpected tensor 'base_model\.model\.layers\.0\.q_proj\.extra'"),
    "foreign prefix": (dict(tensors=lambda t: {**t, "evil": torch.ones(2)}), r"unexpected tensor 'evil'"),
    "integer tensor": (dict(tensors=lambda t: {k: (v.to(torch.int32) if "0.q_proj.lora_A" in k else v) for k, v in t.items()}),
                       r"expected a floating-point tensor"),
    "NaN": (dict(tensors=lambda t: {k: (v * float("nan") if "0.q_proj.lora_B" in k else v) for k, v in t.items()}),
            r"contains NaN"),
    "not a linear": (dict(tensors=lambda t: _rename(t, "layers.0.q_proj", "layers.0.norm")), r"'layers\.0\.norm' is a LayerNorm"),
    "bad JSON": (dict(raw_config="{'r': 2"), r"not valid JSON"),
    "JSON not an object": (dict(raw_config="[1, 2]"), r"expected a JSON object"),
    "wrong JSON type": (dict(config=lambda c: {**c, "r": "2"}), r"'r' must be int"),
    "truncated safetensors": (dict(raw_weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), r"not a readable safetensors"),
    "header claims more bytes": (dict(raw_weights=(64).to_bytes(8, "little") + json.dumps(
        {"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode().ljust(64)),
        r"not a readable safetensors"),
    "dora": (dict(config=lambda c: {**c, "use_dora": True}), r"use_dora=true is not supported"),
    "empty": (dict(tensors=lambda t: {}), r"holds no adapter tensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_rejected_and_model_unchanged(saved, tmp_path, case):
    kwargs, match = BAD_FILES[case]
    bad = _edit(saved, tmp_path, **kwargs)
    model = lowrank.inject(_model(), VeRAConfig(r=2), adapter_name="present")
    snapshot = _snapshot(model)
    with pytest.raises((AdapterFileError, ValueError, TypeError), match=match):
        lowrank.load_adapter(model, bad, "new")
    _assert_unchanged(model, snapshot, ["present"])


def test_full_delta_onto_4bit_base_is_rejected(tmp_path):
    full = lowrank.inject(_model(d=64, hidden=128), FullConfig())
    lowrank.save_adapter(full, tmp_path / "full")
    model = lowrank.quantize_model(_model(d=64, hidden=128))
    snapshot = _snapshot(model)
    with pytest.raises(AdapterFileError, match="full fine-tuning needs a dense weight"):
        lowrank.load_adapter(model, tmp_path / "full")
    _assert_unchanged(model, snapshot, [])


def test_pickle_is_never_loaded(tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 24)}, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps(LoRAConfig(r=2).to_peft_dict()))

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin is pickle, which lowrank never loads"):
        lowrank.load_adapter(_model(), d)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        lowrank.load_adapter(_model(), tmp_path / "nowhere")


def test_name_already_used_is_rejected(saved):
    model = lowrank.inject(_model(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lowrank.load_adapter(model, saved)
    with pytest.raises(ValueError, match="adapter_name"):
        lowrank.load_adapter(model, saved, "bad name")
