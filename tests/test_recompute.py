"""lowrank.recompute_pointwise (python/lowrank/recompute.py): the same losses and gradients bit for bit,
activations actually not kept, autograd's in-place check kept, and the hooks confined to the forward."""

from __future__ import annotations

import collections
import copy
import gc
import weakref

import pytest
import torch
import transformers
from torch import nn

import lowrank
from lowrank import recompute

from conftest import dtype_name

VOCAB = 517


def _tiny(arch: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg).to(dtype)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _adapted(arch: str, dtype: torch.dtype, method: str) -> nn.Module:
    model = _tiny(arch, dtype)
    name, _, variant = method.partition("+")
    if name == "lora":
        model = lowrank.inject(model, lowrank.LoRAConfig(r=4, target_modules="all-linear"))
    elif name == "qlora":
        model = lowrank.inject(model, lowrank.QLoRAConfig(r=4, quantize_base="all-linear"))
    elif name == "vera":
        model = lowrank.inject(model, lowrank.VeRAConfig(r=8, target_modules="all-linear"))
    elif name == "full":
        model = lowrank.inject(model, lowrank.FullConfig())
    elif name == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    else:
        assert name == "plain"
    if variant == "fused-head":
        lowrank.fast_loss(model, keep_logits=False)
    torch.manual_seed(1)
    for p in model.parameters():  # nonzero adapters: they take part in every gradient
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return model.train()


@pytest.fixture
def recipes(monkeypatch):
    """Every saved tensor recomputed rather than stored, counted by its grad_fn; no size floor."""
    monkeypatch.setattr(recompute, "MIN_BYTES", 0)
    made = collections.Counter()
    pack = recompute._pack

    def counting(t):
        packed = pack(t)
        if type(packed) is recompute._Recipe:
            made[type(t.grad_fn).__name__] += 1
        return packed

    monkeypatch.setattr(recompute, "_pack", counting)
    return made


def _step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("method", ["lora", "qlora+fused-head", "vera", "full", "plain", "peft"])
def test_same_loss_and_gradients_bit_for_bit(arch, dtype, method, recipes):
    model = _adapted(arch, dtype, method)
    lean = lowrank.recompute_pointwise(copy.deepcopy(model))
    assert lowrank.recomputes_pointwise(lean) and not lowrank.recomputes_pointwise(model)
    ids = torch.randint(0, VOCAB, (2, 13))
    labels = ids.clone()
    labels[1, :4] = -100
    loss, grads = _step(model, ids, labels)
    assert not recipes, "nothing is recomputed without recompute_pointwise"
    lean_loss, lean_grads = _step(lean, ids, labels)
    if arch == "llama":  # (in GPT-2 it depends on the method: its MLP's GELU is several ops)
        assert recipes["SiluBackward0"] > 0, "the MLP's activation was recomputed"
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, lean_grads[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_what_llama_recomputes(recipes, dtype):
    """Per decoder layer of a LoRA Llama: the MLP's act(gate) and act(gate) * up, and both norms' outputs
    (product of the norm weight and h * rsqrt(...), two ops deep; in bf16 through the cast of that fp32
    product to bf16); and the final norm's, for the head."""
    model = _adapted("llama", dtype, "lora")
    lowrank.recompute_pointwise(model)
    _step(model, torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9)))
    layers = model.config.num_hidden_layers
    assert recipes["SiluBackward0"] == layers
    assert recipes["MulBackward0"] >= 2 * layers + 1


def test_each_recipe_runs_once_per_backward(recipes, monkeypatch):
    """x saved by q, k and v (and by gate and up) is one recipe, made once and shared; act(gate), read
    by the product's recipe and by the product's own backward, is made once too."""
    created, runs = [], collections.Counter()
    init = recompute._Recipe.__init__

    def counting_init(self, make, t):
        key = len(created)
        created.append(key)

        def counted():
            runs[key] += 1
            return make()

        init(self, counted, t)

    monkeypatch.setattr(recompute._Recipe, "__init__", counting_init)
    model = lowrank.recompute_pointwise(_adapted("llama", torch.float32, "lora"))
    _step(model, torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9)))
    assert created and sum(recipes.values()) > len(created), "some tensors were saved more than once"
    assert all(runs[key] == 1 for key in created), runs


def test_recomputed_activations_are_not_kept(recipes):
    """Between forward and backward, the MLP activations' outputs are gone with recompute_pointwise and
    held without it."""
    for lean in (False, True):
        model = lowrank.recompute_pointwise(_adapted("llama", torch.float32, "lora"), enabled=lean)
        outputs = []
        for layer in model.model.layers:
            layer.mlp.act_fn.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
        loss = model(input_ids=torch.randint(0, VOCAB, (2, 9)), labels=torch.randint(0, VOCAB, (2, 9))).loss
        gc.collect()
        alive = [ref() is not None for ref in outputs]
        assert len(alive) == model.config.num_hidden_layers
        assert not any(alive) if lean else all(alive)
        loss.backward()


def test_default_floor_keeps_small_tensors():
    made = []
    pack = recompute._pack

    def recording(t):
        packed = pack(t)
        made.append(type(packed) is recompute._Recipe)
        return packed

    model = lowrank.recompute_pointwise(_adapted("llama", torch.float32, "lora"))
    try:
        recompute._pack = recording
        _step(model, torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 5)))
    finally:
        recompute._pack = pack
    assert made and not any(made), f"tensors under {recompute.MIN_BYTES} bytes are stored as they are"


class _GatedMLP(nn.Module):
    def __init__(self, width: int = 48, hidden: int = 80):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.gate(x), approximate="tanh") * self.up(x))


@pytest.mark.parametrize("retain", [False, True])
def test_gelu_mlp_and_a_second_backward(recipes, retain):
    torch.manual_seed(0)
    model = _GatedMLP()
    lean = lowrank.recompute_pointwise(copy.deepcopy(model))
    x = torch.randn(7, 48)
    y, y_lean = model(x).square().sum(), lean(x).square().sum()
    assert recipes["GeluBackward0"] == 1 and recipes["MulBackward0"] == 1
    grads = []
    for out, m in ((y, model), (y_lean, lean)):
        out.backward(retain_graph=retain)
        if retain:
            out.backward()  # the recipes run again on operands the graph still holds
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_in_place_change_of_a_saved_tensor(recipes):
    """A recomputed tensor that is still alive and was modified in place after it was saved raises the
    error autograd raises without recompute_pointwise. One modified and then dropped (which autograd
    refuses too) gets the gradient of the values it had when it was saved."""

    class Model(nn.Module):
        def forward(self, a, b):
            p = a * b
            out = p * b  # saves p
            p.add_(1)  # modified after it was saved
            self.kept = p if self.keep else None
            return out

    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    for model in (Model(), lowrank.recompute_pointwise(Model())):
        model.keep = True
        out = model(a, b).sum()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
    model.keep = False
    a.grad = b.grad = None
    model(a, b).sum().backward()
    x, y = a.detach(), b.detach()  # out = (a b) b: the gradients of the values before add_
    assert torch.allclose(b.grad, 2 * x * y) and torch.allclose(a.grad, y * y)


def test_hooks_only_inside_the_forward(recipes):
    class Failing(nn.Module):
        def forward(self, a, b):
            _ = a * b * b
            raise ValueError("inside the forward")

    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    with pytest.raises(ValueError, match="inside the forward"):
        lowrank.recompute_pointwise(Failing())(a, b)
    failing_first = lowrank.recompute_pointwise(_GatedMLP())
    failing_first.register_forward_pre_hook(lambda m, args: 1 / 0, prepend=True)  # before recompute's own
    with pytest.raises(ZeroDivisionError):
        failing_first(torch.randn(3, 48))
    assert not recompute._scopes.stack, "no scope left open"
    recipes.clear()
    ((a * b) * b).sum().backward()  # outside any model: saved as usual
    assert not recipes
    model = lowrank.recompute_pointwise(_GatedMLP())
    with torch.no_grad():
        model(torch.randn(3, 48))
    assert not recipes, "nothing is saved without gradients"


def test_enable_disable_and_bad_input():
    model = _GatedMLP()
    assert lowrank.recompute_pointwise(model) is model
    lowrank.recompute_pointwise(model)  # twice: still one pair of hooks
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    assert lowrank.recompute_pointwise(model, enabled=False) is model
    assert not lowrank.recomputes_pointwise(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        lowrank.recompute_pointwise("model")


def test_under_torch_compile(recipes):
    torch.manual_seed(0)
    model = _GatedMLP()
    x = torch.randn(6, 48)
    expected = model(x).sum()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lowrank.recompute_pointwise(model)
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x).sum()
    got.backward()
    assert not recipes, "a compiled forward is left alone"
    assert torch.allclose(got, expected)
    for p, g in zip(model.parameters(), want):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-7)
