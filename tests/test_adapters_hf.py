"""Real model classes (HF transformers GPT-2 with its Conv1D layers, and a Llama built from config;
nothing downloaded): training and ``generate`` through lowrank's adapters, and PEFT parity both ways
— PEFT loads lowrank's adapter files and lowrank loads PEFT's, with equal outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank import FullConfig, LoRAConfig, QLoRAConfig, VeRAConfig

from conftest import GEMM_OPS, aten_calls, within_linear_rounding

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=97, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def _llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _ids(shape=(2, 9), seed=3):
    return torch.randint(2, 97, shape, generator=torch.Generator().manual_seed(seed))


def _peft_config(config):
    if isinstance(config, VeRAConfig):
        return peft.VeraConfig(r=config.r, target_modules=config.target_modules, d_initial=config.d_initial,
                               projection_prng_key=config.projection_prng_key)  # fmt: skip
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules,
                           use_rslora=config.use_rslora)  # fmt: skip


def _randomize(model, name=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.1 if p.dim() == 1 else 0.0))


def _generate(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("config", [
    pytest.param(LoRAConfig(r=4, alpha=8, target_modules="all-linear"), id="lora"),
    pytest.param(LoRAConfig(r=3, alpha=5, use_rslora=True, target_modules=r".*\.(c_attn|q_proj|v_proj|up_proj)"), id="lora-regex"),
    pytest.param(VeRAConfig(r=8, target_modules="all-linear"), id="vera"),
])  # fmt: skip
def test_peft_loads_lowrank_adapters(tmp_path, arch, config):
    model = lowrank.inject(MODELS[arch](), config)
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
    ours_generated = _generate(model, ids[:, :4])
    lowrank.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_model = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "a").eval()
    complaints = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in
                                                         ("fan_in_fan_out", "unexpected", "missing", "ignored"))]  # fmt: skip
    assert not complaints  # PEFT read every key and every config field as they are
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours_generated, _generate(theirs_model, ids[:, :4]))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_lowrank_loads_peft_adapters(tmp_path, arch, method):
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = LoRAConfig(r=4, alpha=16, target_modules=targets) if method == "lora" else VeRAConfig(r=8, target_modules=targets)
    kw = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    pc = _peft_config(config)
    for k, v in kw.items():
        setattr(pc, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MODELS[arch](), pc).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        expected = theirs(ids).logits
    ours = MODELS[arch]()
    lowrank.load_adapter(ours, tmp_path / "peft", "from_peft")
    assert {n for n, _ in lowrank.adapted_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer") and n.count(".") > 2
        and not n.endswith("base_layer")}  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(ours, ids[:, :4]), _generate(theirs, ids[:, :4]))


@pytest.mark.parametrize("arch", list(MODELS))
def test_training_matches_peft_step_for_step(arch):
    """Same init, same data, same optimizer: lowrank's LoRA and PEFT's take the same steps."""
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    ours = lowrank.inject(MODELS[arch](), config)
    _randomize(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(MODELS[arch](), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                      fan_in_fan_out=arch == "gpt2"))  # fmt: skip
    ours_named = dict(lowrank.adapter_parameters(ours))
    theirs_named = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(ours_named) == len(theirs_named)

    def key(name):  # "...q_proj.adapters.default.lora_A.weight" / "...q_proj.lora_A.default.weight"
        return name.replace("base_model.model.", "").replace(".adapters.default", "").replace(".default", "")

    theirs_by_key = {key(n): p for n, p in theirs_named.items()}
    with torch.no_grad():
        for n, p in ours_named.items():
            theirs_by_key[key(n)].copy_(p)
    # SGD: a difference in the gradients shows in proportion (Adam would blow rounding noise up)
    opt_ours = torch.optim.SGD(ours_named.values(), lr=0.5, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs_named.values(), lr=0.5, momentum=0.9)
    ours.train(), theirs.train()
    losses = []
    for step in range(4):
        ids = _ids((4, 12), seed=step)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    ours_losses, theirs_losses = losses[0::2], losses[1::2]
    assert ours_losses[-1] < ours_losses[0]
    for a, b in zip(ours_losses, theirs_losses):
        assert abs(a - b) < 1e-5 * max(1.0, abs(b))
    for n, p in ours_named.items():
        torch.testing.assert_close(p, theirs_by_key[key(n)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("config", [
    pytest.param(QLoRAConfig(r=4, alpha=16, quantize_base="all-linear"), id="qlora"),
    pytest.param(FullConfig(), id="full"),
    pytest.param(VeRAConfig(r=16), id="vera"),
])  # fmt: skip
def test_every_method_trains_and_generates(tmp_path, arch, config):
    model = lowrank.inject(MODELS[arch](), config)
    opt = torch.optim.AdamW([p for _, p in lowrank.adapter_parameters(model)], lr={"full": 3e-3, "qlora": 1e-2, "vera": 5e-2}[config.method])
    ids = _ids((4, 12), seed=0)  # one batch, learned by heart: the loss must fall
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses[-4:]), losses
    model.eval()
    generated = _generate(model, ids[:, :4])
    assert generated.shape == (4, 10)
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = lowrank.quantize_model(MODELS[arch]()) if config.method == "qlora" else MODELS[arch]()
    lowrank.load_adapter(fresh, tmp_path / "a")
    # full fine-tuning saves ΔW = W' - W0 in fp32 and rebuilds W0 + ΔW: one rounding of W' at most
    tol = dict(rtol=1e-5, atol=1e-5) if config.method == "full" else dict(rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, **tol)


def test_bf16_llama_lora_matches_peft():
    config = LoRAConfig(r=4, alpha=8)
    ours = lowrank.inject(_llama(dtype=torch.bfloat16), config)
    _randomize(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_llama(dtype=torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for (n, p), (_, q) in zip(lowrank.adapter_parameters(ours), [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]):
            q.copy_(p)
    ids = _ids()
    ref = None
    with torch.no_grad():
        ours_out, theirs_out = ours(ids).logits.float(), theirs(ids).logits.float()
        # float64 reference: the model with each dense weight + s·BA, in float64
        ref_model = _llama().double()
        ref_model.load_state_dict({k: v.double() for k, v in _llama(dtype=torch.bfloat16).state_dict().items()})
        for name, layer in lowrank.adapted_layers(ours):
            ref_model.get_submodule(name).weight += layer.delta_weight("default").double()
        ref = ref_model(ids).logits
    ours_err = (ours_out.double() - ref).abs().max()
    theirs_err = (theirs_out.double() - ref).abs().max()
    # within twice PEFT's own bf16 error (measured on a Zen 4: 2.8e-3 against 4.1e-3, logits up to 1.2),
    # and never more than one bf16 rounding of the logits' scale should PEFT happen to be very close
    assert ours_err <= max(2 * theirs_err, 2.0**-8 * ref.abs().max()), (ours_err, theirs_err)


def test_modules_to_save_file_matches_peft(tmp_path):
    config = LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"])
    model = lowrank.inject(_gpt2(), config)
    _randomize(model)
    lowrank.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "a").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    ours = _gpt2()
    lowrank.load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("config", [pytest.param(LoRAConfig(r=4, alpha=8, target_modules="all-linear"), id="lora"),
                                    pytest.param(VeRAConfig(r=8, target_modules="all-linear"), id="vera")])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_conv1d_bases_take_the_fused_kernels(tmp_path, config, dtype, monkeypatch):
    """GPT-2's Conv1D weights ([in, out]) are re-laid in memory as [out, in] rows when injected (same
    shape, values and parameter), so the adapters run the fused kernels, as over nn.Linear: no torch
    GEMM over the Conv1D weight in a few-token forward, outputs as a float64 reference, the state
    dict's values unchanged, and merge_and_unload gives back contiguous [in, out] weights that
    safetensors saves as they are."""
    from safetensors.torch import save_file

    from lowrank.adapters.layer import dense_base_weight

    model = _gpt2(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    lowrank.inject(model, config)
    _randomize(model)
    layers = dict(lowrank.adapted_layers(model))
    assert layers and all(layer.kind == "conv1d" for layer in layers.values())
    for name, layer in layers.items():
        w = layer.base_layer.weight
        assert w is params[f"{name}.weight"] and w.shape == before[f"{name}.weight"].shape
        assert torch.equal(w, before[f"{name}.weight"]) and dense_base_weight(layer.base_layer).is_contiguous()

    def gemm_over_the_conv1d_weight(calls) -> bool:  # its [in, out] = (48, 192) as a GEMM's operand
        return any(op in GEMM_OPS and ((48, 192), dtype) in args for op, args in calls)

    layer = layers["transformer.h.0.mlp.c_fc"]
    x = torch.randn(3, 48, dtype=dtype)
    with torch.no_grad():
        calls, y = aten_calls(lambda: layer(x))
    assert not gemm_over_the_conv1d_weight(calls), calls
    # within fp32 sums of the terms (and the term's own products) and one rounding to the dtype; the
    # adapter's share is larger than that bound, so a missing or wrong term fails
    bias = layer.base_layer.bias
    w64 = layer.base_layer.weight.double() + layer.delta_weight(lowrank.active_adapter(model)).double().t()
    expected = x.double() @ w64 + bias.double()
    terms = x.double().abs() @ w64.abs() + bias.double().abs()
    bound = terms * (48 + 16) * 2.0**-24 + expected.abs() * (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    assert ((y.double() - expected).abs() <= bound).all()
    assert ((x.double() @ layer.base_layer.weight.double() + bias.double() - expected).abs() > bound).any()
    # the base alone (adapters disabled): the row kernel over the same rows for these few tokens
    monkeypatch.setattr(lowrank.ops._runtime, "CPU_ROWS_MAX_M", {dtype: 16})
    with torch.no_grad(), lowrank.disable_adapters(model):
        calls, y0 = aten_calls(lambda: layer(x))
    assert not gemm_over_the_conv1d_weight(calls), calls
    assert within_linear_rounding(y0, x, layer.base_layer.weight.t(), bias)
    # training goes through them too: the adapter gets a gradient, the base none
    layer(x.requires_grad_(True)).float().sum().backward()
    assert layer.base_layer.weight.grad is None and all(p.grad is not None for p in layer.adapters.parameters() if p.requires_grad)
    plain = lowrank.merge_and_unload(model)
    conv = plain.get_submodule("transformer.h.0.mlp.c_fc")
    assert conv.weight.is_contiguous() and conv.weight.shape == (48, 192)
    save_file({k: v for k, v in plain.state_dict().items() if "c_fc" in k}, str(tmp_path / "w.safetensors"))
