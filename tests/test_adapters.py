"""Model-level adapter API on plain PyTorch models: configs, injection and target matching, names,
switching, disabling, merging, unloading, the trainable summary. (Files: test_adapter_files.py; HF
transformers models and PEFT parity: test_adapters_hf.py.)"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import lowrank
from lowrank import AdaptedLinear, FullConfig, LoRAConfig, ModulesToSave, QLoRAConfig, VeRAConfig

from conftest import GEMM_OPS, aten_calls, within_linear_rounding

ALL_CONFIGS = [
    pytest.param(LoRAConfig(r=4, alpha=8), id="lora"),
    pytest.param(LoRAConfig(r=3, alpha=5, use_rslora=True), id="lora-rslora"),
    pytest.param(VeRAConfig(r=8, d_initial=0.3), id="vera"),
    pytest.param(QLoRAConfig(r=4, alpha=8), id="qlora"),
    pytest.param(FullConfig(), id="full"),
]


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q_proj(h) + self.down_proj(torch.relu(self.up_proj(h)))


class Tiny(nn.Module):
    """Embedding, two blocks, an output head: the shape of a language model, small and odd-sized."""

    def __init__(self, d: int = 24, hidden: int = 40, vocab: int = 37, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=dtype)
        self.layers = nn.ModuleList([Block(d, hidden).to(dtype) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=dtype)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def _model(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw)


def _randomize(model: nn.Module, adapter_name=None, std: float = 0.05) -> None:
    """Non-trivial adapter weights (a fresh adapter is the identity, which would hide mistakes)."""
    with torch.no_grad():
        for name, p in lowrank.adapter_parameters(model, adapter_name):
            if ".adapters." in name and isinstance(_owner(model, name), lowrank.FullDelta):
                p.add_(torch.randn_like(p) * std)
            else:
                p.copy_(torch.randn_like(p) * std + (0.1 if p.dim() == 1 else 0.0))


def _owner(model, param_name):
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _ids(seed: int = 1, shape=(3, 5)) -> torch.Tensor:
    return torch.randint(0, 37, shape, generator=torch.Generator().manual_seed(seed))


def _reference_logits(model: Tiny, ids, deltas: dict[str, torch.Tensor], adapter_name=None) -> torch.Tensor:
    """float64 reference: each Linear's dense weight plus its adapter's ΔW (and a full adapter's Δbias)."""
    ref = _model()
    ref.load_state_dict({k: v for k, v in _plain_state(model).items()})
    ref = ref.double()
    name = adapter_name or lowrank.active_adapter(model)
    with torch.no_grad():
        for layer_name, delta in deltas.items():
            ref.get_submodule(layer_name).weight += delta.double()
            layer = model.get_submodule(layer_name)
            adapter = layer.adapters[name] if name in layer.adapters else None
            if isinstance(adapter, lowrank.FullDelta) and adapter.bias is not None:
                ref.get_submodule(layer_name).bias += (adapter.bias - layer.base_layer.bias).double()
        return ref(ids)


def _plain_state(model) -> dict:
    """The base model's own state dict (the bases of adapted layers, dequantized when 4-bit)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            base = module.base_layer
            w = base.dequantize(torch.float32) if isinstance(base, lowrank.NF4Linear) else base.weight
            out[name + ".weight"] = w.detach().float()
            if base.bias is not None:
                out[name + ".bias"] = base.bias.detach().float()
    for name, p in model.named_parameters():
        if ".adapters." in name or ".base_layer." in name or ".copies." in name:
            continue
        out[name.replace(".original_module", "")] = p.detach().float()
    return out


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ALL_CONFIGS + [
    pytest.param(LoRAConfig(r=2, target_modules=["q_proj"], exclude_modules=r".*1\..*", modules_to_save=["norm"],
                            adapter_dtype=torch.float32), id="lora-options"),
    pytest.param(QLoRAConfig(r=2, blocksize=128, double_quant=False, compute_dtype="bfloat16",
                             quantize_base="all-linear"), id="qlora-options"),
])  # fmt: skip
def test_config_json_round_trip(config):
    again = lowrank.AdapterConfig.from_json(config.to_json())
    assert again == config and type(again) is type(config)


def test_config_peft_file_round_trip():
    for config in (LoRAConfig(r=4, alpha=16, dropout=0.1, use_rslora=True, target_modules=["q", "v"]),
                   VeRAConfig(r=16, d_initial=0.2, projection_prng_key=7, save_projection=False), FullConfig()):  # fmt: skip
        data = json.loads(json.dumps(config.to_peft_dict()))
        assert lowrank.AdapterConfig.from_dict(data) == config


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r: expected a positive int"),
    (dict(r=2.5), "r: expected a positive int"),
    (dict(dropout=1.0), "dropout: expected a probability"),
    (dict(alpha="8"), "alpha: expected a number"),
    (dict(target_modules=None), "target_modules"),
    (dict(target_modules=[1]), "target_modules"),
    (dict(target_modules=""), "target_modules"),
    (dict(modules_to_save="norm"), "modules_to_save"),
    (dict(adapter_dtype=torch.int8), "adapter_dtype"),
])  # fmt: skip
def test_config_rejects_bad_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoRAConfig(**kwargs)


def test_config_rejects_bad_qlora_and_unknown_method():
    with pytest.raises(ValueError, match="blocksize"):
        QLoRAConfig(blocksize=48)
    with pytest.raises(ValueError, match="quantize_base"):
        QLoRAConfig(quantize_base="everything")
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        lowrank.AdapterConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="unknown fields"):
        lowrank.AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="not valid JSON"):
        lowrank.AdapterConfig.from_json("{r: 4")


# ---------------------------------------------------------------------------------------------
# Injection and targets
# ---------------------------------------------------------------------------------------------
def _adapted_names(model) -> list[str]:
    return [n for n, _ in lowrank.adapted_layers(model)]


@pytest.mark.parametrize("targets, exclude, expected", [
    ("all-linear", None, ["layers.0.q_proj", "layers.0.up_proj", "layers.0.down_proj",
                          "layers.1.q_proj", "layers.1.up_proj", "layers.1.down_proj"]),
    (["q_proj"], None, ["layers.0.q_proj", "layers.1.q_proj"]),
    (["0.up_proj", "down_proj"], None, ["layers.0.up_proj", "layers.0.down_proj", "layers.1.down_proj"]),
    (r"layers\.1\.(q|up)_proj", None, ["layers.1.q_proj", "layers.1.up_proj"]),
    ("all-linear", ["down_proj"], ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]),
    ("all-linear", r"layers\.0\..*", ["layers.1.q_proj", "layers.1.up_proj", "layers.1.down_proj"]),
    (["lm_head"], None, ["lm_head"]),
])  # fmt: skip
def test_target_matching(targets, exclude, expected):
    model = lowrank.inject(_model(), LoRAConfig(r=2, target_modules=targets, exclude_modules=exclude))
    assert sorted(_adapted_names(model)) == sorted(expected)


def test_suffix_matches_whole_name_parts_only():
    # "proj" is not a suffix of "q_proj" in PEFT's sense (a whole dotted component is needed)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lowrank.inject(_model(), LoRAConfig(r=2, target_modules=["proj"]))


def test_no_match_is_a_clear_error_and_changes_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target_modules: \['nope'\].*layers\.0\.q_proj"):
        lowrank.inject(model, LoRAConfig(r=2, target_modules=["nope"]))
    assert _adapted_names(model) == [] and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_inject_freezes_base_and_trains_adapter(config):
    model = lowrank.inject(_model(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in lowrank.adapter_parameters(model)}
    assert trainable == adapter and adapter
    assert lowrank.active_adapter(model) == "default"
    _randomize(model)
    logits = model(_ids())
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in adapter), name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_forward_matches_float64_reference(config):
    model = lowrank.inject(_model(), config)
    _randomize(model)
    ids = _ids(shape=(2, 7))
    deltas = {n: layer.delta_weight("default") for n, layer in lowrank.adapted_layers(model)}
    with torch.no_grad():
        got = model(ids)
    ref = _reference_logits(model, ids, deltas)
    err = (got.double() - ref).abs().max().item()
    # fp32 model vs float64: a few hundred ulps of the logits' scale at most
    assert err <= 64 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item()), err


def test_fresh_adapters_are_identity():
    ids = _ids()
    base = _model()
    with torch.no_grad():
        expected = base(ids)
    for config in (LoRAConfig(r=4), VeRAConfig(r=4), FullConfig()):
        model = lowrank.inject(_model(), config)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-6)


def test_modules_to_save_trains_a_copy():
    model = lowrank.inject(_model(), LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed"]))
    assert isinstance(model.lm_head, ModulesToSave) and isinstance(model.embed, ModulesToSave)
    original = model.lm_head.original_module.weight.clone()
    assert not model.lm_head.original_module.weight.requires_grad
    assert model.lm_head.copies["default"].weight.requires_grad
    opt = torch.optim.SGD([p for _, p in lowrank.adapter_parameters(model)], lr=0.1)
    model(_ids()).square().mean().backward()
    opt.step()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert not torch.equal(model.lm_head.copies["default"].weight, original)
    with lowrank.disable_adapters(model):
        assert model.lm_head.weight is model.lm_head.original_module.weight  # attribute access reads through


def test_modules_to_save_missing_is_an_error():
    model = _model()
    with pytest.raises(ValueError, match=r"modules_to_save: \['classifier'\]"):
        lowrank.inject(model, LoRAConfig(r=2, modules_to_save=["classifier"]))
    assert _adapted_names(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_stores_4bit_bases(dtype):
    model = lowrank.inject(_model(dtype=dtype, d=64, hidden=128), QLoRAConfig(r=4, target_modules=["q_proj", "up_proj"]))
    for name, layer in lowrank.adapted_layers(model):
        assert layer.kind == "nf4" and isinstance(layer.base_layer, lowrank.NF4Linear)
    assert isinstance(model.layers[0].down_proj, nn.Linear)  # quantize_base="targets"
    model_all = lowrank.inject(_model(dtype=dtype, d=64, hidden=128),
                               QLoRAConfig(r=4, target_modules=["q_proj"], quantize_base="all-linear"))  # fmt: skip
    assert isinstance(model_all.layers[0].down_proj, lowrank.NF4Linear)
    assert isinstance(model_all.lm_head, nn.Linear)  # the output head stays dense
    out = model_all(_ids())
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_qlora_bits_per_parameter_on_a_larger_layer():
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    lowrank.inject(model, QLoRAConfig(r=8))
    base = model[0].base_layer
    n = 1024 * 1024
    # 4 bits + an 8-bit scale per 64 + a 32-bit scale per 256·64, + the layer's 256-entry fp32 code map
    assert 8 * base.nbytes() == 4 * n + 8 * n // 64 + 32 * (n // 64 // 256) + 32 * 256 + 32
    assert abs(8 * base.nbytes() / n - 4.127) < 0.01


def test_full_over_4bit_base_is_refused():
    model = lowrank.inject(_model(), QLoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="full fine-tuning needs a dense weight"):
        lowrank.inject(model, FullConfig(target_modules=["q_proj"]), adapter_name="full")
    assert lowrank.adapter_names(model) == ["default"]


def test_qlora_after_dense_adapters_is_refused():
    model = lowrank.inject(_model(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="inject QLoRA before other adapters"):
        lowrank.inject(model, QLoRAConfig(r=2), adapter_name="q")


def test_quantize_model_then_lora_is_qlora():
    model = lowrank.quantize_model(_model(d=64, hidden=128))
    assert isinstance(model.layers[0].q_proj, lowrank.NF4Linear) and isinstance(model.lm_head, nn.Linear)
    lowrank.inject(model, LoRAConfig(r=4))
    assert all(layer.kind == "nf4" for _, layer in lowrank.adapted_layers(model))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        lowrank.inject("model", LoRAConfig())
    with pytest.raises(TypeError, match="config: expected"):
        lowrank.inject(_model(), {"r": 4})
    for bad in ("", "a.b", "1st", "__base__", 3):
        with pytest.raises(ValueError, match="adapter_name"):
            lowrank.inject(_model(), LoRAConfig(), adapter_name=bad)
    model = lowrank.inject(_model(), LoRAConfig())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lowrank.inject(model, VeRAConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lowrank.set_adapter(model, "x")
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lowrank.delete_adapter(model, "x")
    with pytest.raises(ValueError, match="no active adapter"):
        lowrank.merge(_model())


# ---------------------------------------------------------------------------------------------
# Several adapters, switching, disabling
# ---------------------------------------------------------------------------------------------
def _three_adapters():
    model = lowrank.inject(_model(), LoRAConfig(r=4, alpha=8), adapter_name="lora")
    _randomize(model, "lora")
    lowrank.inject(model, VeRAConfig(r=6, target_modules=["up_proj", "down_proj"]), adapter_name="vera")
    _randomize(model, "vera")
    lowrank.inject(model, FullConfig(target_modules=["q_proj"]), adapter_name="full")
    _randomize(model, "full")
    return model


def test_named_adapters_switch_and_match_each_alone():
    model = _three_adapters()
    ids = _ids()
    assert lowrank.adapter_names(model) == ["lora", "vera", "full"]  # in the order they were added
    assert lowrank.active_adapter(model) == "full"  # the newest injected is active
    outs = {}
    for name in ("lora", "vera", "full"):
        lowrank.set_adapter(model, name)
        assert lowrank.active_adapter(model) == name
        deltas = {n: layer.delta_weight(name) for n, layer in lowrank.adapted_layers(model) if name in layer.adapters}
        with torch.no_grad():
            outs[name] = model(ids)
        ref = _reference_logits(model, ids, deltas)
        assert (outs[name].double() - ref).abs().max() < 1e-4
    assert not torch.allclose(outs["lora"], outs["vera"]) and not torch.allclose(outs["lora"], outs["full"])
    with lowrank.disable_adapters(model):
        with torch.no_grad():
            base = model(ids)
        assert lowrank.active_adapter(model) == "full" or True
    with torch.no_grad():
        # the base model's logits, summed in another order: the frozen head (FrozenLinear) and the bases
        # (frozen_linear) take the row kernel for these few tokens, the plain model torch's GEMM
        torch.testing.assert_close(base, _model()(ids))
        torch.testing.assert_close(model(ids), outs["full"], rtol=0, atol=0)  # re-enabled on exit


def test_switching_never_touches_the_base():
    model = _three_adapters()
    storages = {n: p.data_ptr() for n, p in model.named_parameters() if ".base_layer." in n}
    values = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
    for name in ("lora", "vera", "full", "lora"):
        lowrank.set_adapter(model, name)
        model(_ids()).sum().backward()
    for n, p in model.named_parameters():
        if n in storages:
            assert p.data_ptr() == storages[n] and torch.equal(p, values[n]) and p.grad is None


def _aten_ops(fn):
    """The aten ops ``fn()`` runs, and its result."""
    calls, out = aten_calls(fn)
    return [op for op, _ in calls], out


def test_switching_runs_no_tensor_operation():
    """A switch costs a pointer per layer, whatever the weights' size: not a single tensor operation
    (allocation, copy, arithmetic) runs while it happens."""
    model = _three_adapters()

    def switch():
        for name in ("lora", "vera", "full", "lora"):
            lowrank.set_adapter(model, name)
        with lowrank.disable_adapters(model):
            pass

    assert _aten_ops(switch)[0] == []
    assert len(_aten_ops(lambda: model(_ids()))[0]) > 10  # the recorder does see tensor work


@pytest.mark.parametrize("kernel", [True, False], ids=["row-kernel", "gemm"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_takes_rows_not_a_weight_copy_per_batch_entry(dtype, batch, kernel, monkeypatch):
    """Transformers' prefill gives the output head ``hidden[:, -1:, :]``, whose leading dimensions are no
    view of rows. With the head frozen (inject freezes it), torch's matmul would run a batched matmul
    over the weight expanded to every batch entry (a copy of the whole weight per entry). lowrank makes
    the head a FrozenLinear (its class changed, nothing else): a few tokens without gradients take the
    row kernel (streaming W once), anything else one GEMM over rows. Both paths are pinned in turn."""
    from lowrank.ops import _runtime

    monkeypatch.setattr(_runtime, "CPU_ROWS_MAX_M", {dtype: 1 << 20 if kernel else 0})
    model = _model(dtype=dtype)
    keys = list(model.state_dict())
    weight = model.lm_head.weight
    lowrank.inject(model, LoRAConfig(r=4, alpha=8))
    lowrank.inject(model, VeRAConfig(r=8), adapter_name="second")
    head = model.lm_head
    assert type(head) is lowrank.FrozenLinear and isinstance(head, nn.Linear) and head.weight is weight
    assert not head.weight.requires_grad and not head._forward_pre_hooks
    assert [k for k in model.state_dict() if k.startswith("lm_head.")] == [k for k in keys if k.startswith("lm_head.")]
    hidden = torch.randn(batch, 7, 24, dtype=dtype)
    x = hidden[:, -1:, :]  # strides [7·24, 24, 1]: at batch 1 contiguous, yet no view of rows for matmul

    def path_ok(ops) -> bool:  # the row kernel: no GEMM at all; else one GEMM (torch's or oneDNN's), no bmm
        found = [op for op in ops if op in GEMM_OPS]
        return found == [] if kernel else len(found) == 1 and torch.ops.aten.bmm.default not in found

    with torch.no_grad():
        head(x)  # (any measured choice the call needs is taken now, not while recording)
        ops, y = _aten_ops(lambda: head(x))
    assert path_ok(ops), ops
    assert y.shape == (batch, 1, 37) and within_linear_rounding(y, x, head.weight)
    # copies keep the class (deepcopy, pickle)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied.lm_head) is lowrank.FrozenLinear
        with torch.no_grad():
            ops, y2 = _aten_ops(lambda: copied.lm_head(x))
        assert path_ok(ops) and torch.equal(y2, y)
    # gradients wanted: torch's GEMM over rows, and they reach x
    xg = x.detach().clone().requires_grad_(True)
    ops, yg = _aten_ops(lambda: head(xg))
    assert torch.ops.aten.bmm.default not in ops and within_linear_rounding(yg.detach(), x, head.weight)
    yg.sum().backward()  # dx = 1·W: each row the column sums of W
    assert within_linear_rounding(xg.grad, torch.ones(batch, 37, dtype=dtype), head.weight.t())
    # a head kept per adapter (modules_to_save): its frozen original, which runs with adapters disabled
    saved = _model(dtype=dtype)
    lowrank.inject(saved, LoRAConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    assert type(saved.lm_head.original_module) is lowrank.FrozenLinear
    lowrank.inject(saved, LoRAConfig(r=2, modules_to_save=["lm_head"]), adapter_name="two")
    assert type(saved.lm_head.copies["two"]) is nn.Linear  # a trainable copy is a plain one, made after it too
    lowrank.set_adapter(saved, "default")
    with torch.no_grad(), lowrank.disable_adapters(saved):
        ops, y = _aten_ops(lambda: saved.lm_head(x))
    assert path_ok(ops) and within_linear_rounding(y, x, saved.lm_head.original_module.weight)
    # an adapted layer's base alone (adapters disabled) takes the same paths
    q = model.layers[0].q_proj
    with torch.no_grad(), lowrank.disable_adapters(model):
        ops, y = _aten_ops(lambda: q(x))
    assert path_ok(ops), ops
    assert within_linear_rounding(y, x, q.base_layer.weight, q.base_layer.bias)
    # merge_and_unload leaves no lowrank class behind
    lowrank.merge_and_unload(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is weight


def test_a_frozen_head_of_a_linear_subclass_keeps_its_class_and_takes_rows():
    """A head whose class is an ``nn.Linear`` subclass (forward unchanged) keeps its class; the rows come
    from a forward pre-hook, put on once."""

    class Head(nn.Linear):
        pass

    model = _model()
    model.lm_head = Head(24, 37, bias=False)
    lowrank.inject(model, LoRAConfig(r=4, alpha=8))
    lowrank.inject(model, VeRAConfig(r=8), adapter_name="second")
    head = model.lm_head
    assert type(head) is Head
    assert sum(h is lowrank.adapters.layer.fold_rows_pre_hook for h in head._forward_pre_hooks.values()) == 1
    x = torch.randn(5, 7, 24)[:, -1:, :]
    with torch.no_grad():
        ops, y = _aten_ops(lambda: head(x))
    assert torch.ops.aten.bmm.default not in ops and within_linear_rounding(y, x, head.weight)


@pytest.mark.parametrize("native", [True, False], ids=["bf16-gemm", "widened"])
def test_frozen_bf16_linear_with_gradients_on_either_gemm(native, monkeypatch):
    """A frozen bf16 head in training (x requires grad, M above the row kernel's crossover): torch's bf16
    GEMM where this machine measured it the faster, else fp32 GEMMs over W widened tile by tile (an AVX2
    CPU), both directions: each output and each input-gradient element fp32 sums rounded once to bf16."""
    from lowrank.ops import _gemm, _runtime
    from lowrank.ops.lora import frozen_linear

    monkeypatch.setattr(_gemm, "cpu_bf16_gemm_native", lambda: native)
    monkeypatch.setattr(_runtime, "CPU_ROWS_MAX_M", {torch.bfloat16: 0, torch.float32: 0})
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(301, 67, generator=gen) * 0.3).bfloat16()
    bias = torch.randn(301, generator=gen).bfloat16()
    x = torch.randn(2, 9, 67, generator=gen).bfloat16().requires_grad_(True)

    def gemm_dtypes(calls) -> list:  # the dtypes of each GEMM's operands
        return [{dtype for _, dtype in args} for op, args in calls if op in GEMM_OPS]

    calls, y = aten_calls(lambda: frozen_linear(x, w, bias))
    forward = gemm_dtypes(calls)
    assert forward and forward == [{torch.bfloat16 if native else torch.float32}] * len(forward)
    assert len(forward) == 1 or not native
    assert y.dtype == torch.bfloat16 and y.requires_grad and within_linear_rounding(y.detach(), x.detach(), w, bias)
    dy = torch.randn(2, 9, 301, generator=gen).bfloat16()
    backward = gemm_dtypes(aten_calls(lambda: y.backward(dy))[0])
    assert backward and backward == [{torch.bfloat16 if native else torch.float32}] * len(backward)
    assert x.grad.dtype == torch.bfloat16 and within_linear_rounding(x.grad, dy, w.t())


def test_frozen_linear_matches_a_float64_reference_and_rejects_what_linear_rejects():
    """``ops/lora.py``'s ``frozen_linear`` on odd shapes, with and without bias, both dtypes, on the row
    kernel and the GEMM: fp32 sums rounded once. Bad arguments raise torch's own errors."""
    from lowrank.ops import _runtime
    from lowrank.ops.lora import frozen_linear

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k, lead in ((37, 24, (3,)), (129, 67, (2, 5)), (1, 1, (1,)), (300, 129, (17,))):
            w = (torch.randn(n, k, generator=gen) * 0.3).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            x = torch.randn(*lead, k, generator=gen).to(dtype)
            for limit in (0, 1 << 20):
                _runtime.CPU_ROWS_MAX_M = {dtype: limit}
                try:
                    for bias in (None, b):
                        with torch.no_grad():
                            y = frozen_linear(x, w, bias)
                        assert y.shape == (*lead, n) and y.dtype == dtype
                        assert within_linear_rounding(y, x, w, bias), (dtype, n, k, lead, limit)
                finally:
                    _runtime.CPU_ROWS_MAX_M = None
    # under autocast, autocast's dtype (as nn.Linear's), in inference and training
    w, x = torch.randn(37, 24), torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert frozen_linear(x, w).dtype == torch.bfloat16
        assert frozen_linear(x.requires_grad_(True), w).dtype == torch.bfloat16
    w = torch.randn(5, 4)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            frozen_linear(torch.randn(3, 6), w)  # width
        with pytest.raises(RuntimeError):
            frozen_linear(torch.randn(3, 4, dtype=torch.float64), w)  # dtype
        with pytest.raises(RuntimeError):
            frozen_linear(torch.randn(3, 4), w, torch.randn(4))  # bias length


@pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0", reason="records torch 2.13.0's matmul")
def test_torch_runs_a_frozen_linear_on_unfoldable_input_as_a_batched_matmul():
    """Why the test above matters: torch 2.13.0's own nn.Linear, frozen, takes the batched matmul over
    the expanded weight for such an input (and folds it into rows once the weight requires grad). When
    this fails, torch folds by itself and ``fold_rows`` has become redundant (it stays harmless)."""
    for batch in (1, 5):
        plain = nn.Linear(24, 37, bias=False)
        x = torch.randn(batch, 7, 24)[:, -1:, :]
        with torch.no_grad():
            trainable_ops, _ = _aten_ops(lambda: plain(x))
            plain.requires_grad_(False)
            frozen_ops, _ = _aten_ops(lambda: plain(x))
            contiguous_ops, _ = _aten_ops(lambda: plain(x.contiguous()))
        assert torch.ops.aten.bmm.default not in trainable_ops
        assert torch.ops.aten.bmm.default in frozen_ops
        assert (torch.ops.aten.bmm.default in contiguous_ops) == (batch == 1)  # contiguous() keeps batch 1's strides


def test_delete_adapter():
    model = _three_adapters()
    lowrank.set_adapter(model, "vera")
    lowrank.delete_adapter(model, "vera")
    assert lowrank.adapter_names(model) == ["lora", "full"]
    assert lowrank.active_adapter(model) is None  # the active one went: the base runs
    with torch.no_grad():  # (summed in another order where the frozen head and bases take the row kernel)
        torch.testing.assert_close(model(_ids()), _model()(_ids()))
    lowrank.delete_adapter(model, "full")
    lowrank.delete_adapter(model, "lora")
    assert _adapted_names(model) == [] and isinstance(model.layers[0].q_proj, nn.Linear)


def test_disable_while_merged_is_refused():
    model = _three_adapters()
    lowrank.merge(model, "lora")
    with pytest.raises(RuntimeError, match="unmerge them first"):
        with lowrank.disable_adapters(model):
            pass


# ---------------------------------------------------------------------------------------------
# Merge, unmerge, unload
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if c.id != "qlora"])  # qlora: see test_merge_into_4bit
def test_merge_unmerge_round_trip(config):
    model = lowrank.inject(_model(), config)
    _randomize(model)
    ids = _ids()
    base_weights = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
    with torch.no_grad():
        expected = model(ids)
        assert lowrank.merge(model) == {}
        merged = model(ids)
        with pytest.raises(RuntimeError, match="already merged"):
            lowrank.merge(model)
        lowrank.unmerge(model)
        unmerged = model(ids)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, expected, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], rtol=0, atol=2e-7)


def test_merge_one_adapter_of_several():
    model = _three_adapters()
    ids = _ids()
    lowrank.set_adapter(model, "lora")
    with torch.no_grad():
        expected = model(ids)
        lowrank.merge(model, "lora")
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
        lowrank.set_adapter(model, "vera")  # runs vera over the base that now holds lora
        deltas = {}
        for n, layer in lowrank.adapted_layers(model):
            d = 0
            if "vera" in layer.adapters:
                d = d + layer.delta_weight("vera")
            deltas[n] = d if torch.is_tensor(d) else torch.zeros(layer.out_features, layer.in_features)
        got = model(ids)
    ref = _reference_logits(model, ids, deltas, "vera")  # the reference reads the (merged) base weights
    assert (got.double() - ref).abs().max() < 1e-4


def test_merge_into_4bit_is_lossy_and_reported():
    model = lowrank.inject(_model(d=64, hidden=128), QLoRAConfig(r=4))
    _randomize(model)
    codes = {n: layer.base_layer.weight.clone() for n, layer in lowrank.adapted_layers(model)}
    with pytest.warns(UserWarning, match="lossy"):
        reports = lowrank.merge(model)
    assert set(reports) == set(codes)
    for report in reports.values():
        assert 0 < report["mean_abs_error"] <= report["max_abs_error"] and report["adapter_mean_abs"] > 0
    lowrank.unmerge(model)
    for n, layer in lowrank.adapted_layers(model):
        assert torch.equal(layer.base_layer.weight, codes[n])  # unmerge restores the codes exactly


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_merge_and_unload_gives_plain_linears(config):
    model = lowrank.inject(_model(d=64, hidden=128), config, adapter_name="x")
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
        plain = lowrank.merge_and_unload(model)
        got = plain(ids)
    for name, module in plain.named_modules():
        assert not isinstance(module, (AdaptedLinear, ModulesToSave, lowrank.NF4Linear)), name
    assert type(plain.layers[0].q_proj) is nn.Linear
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def test_trainable_summary_counts():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    lowrank.inject(model, LoRAConfig(r=4))
    s = lowrank.trainable_summary(model)
    lora = 2 * sum(4 * (24 + 24) + 4 * (24 + 40) + 4 * (40 + 24) for _ in range(1))
    assert s.trainable_params == lora
    assert s.total_params == total + lora
    assert s.trainable_bytes == 4 * lora
    assert "trainable:" in str(s) and f"{lora:,}" in str(s)


def test_trainable_summary_vera_counts_shared_projections_once_and_4bit_as_weights():
    model = lowrank.inject(_model(), VeRAConfig(r=8))
    s = lowrank.trainable_summary(model)
    layers = dict(lowrank.adapted_layers(model))
    assert s.trainable_params == sum(8 + layer.out_features for layer in layers.values())
    a = layers["layers.0.q_proj"].adapters["default"].vera_A
    assert all(layer.adapters["default"].vera_A is a for layer in layers.values())
    q = lowrank.inject(_model(d=64, hidden=128), QLoRAConfig(r=4))
    qs = lowrank.trainable_summary(q)
    dense = lowrank.trainable_summary(_model(d=64, hidden=128))
    assert qs.total_params == dense.total_params + qs.trainable_params
    assert qs.total_bytes < dense.total_bytes
