"""A gated MLP's SiLU product on lowrank's CPU kernels (lowrank/swiglu.py, csrc/cpu/pointwise.cpp) against a
float64 reference on fresh random inputs and odd widths, forward and backward, every CPU kernel variant;
outputs poisoned before the kernel writes them; bad input; and ``fast_swiglu`` on a transformers model
against its own LlamaMLP."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank import _C
from lowrank._validate import matrix
from lowrank.swiglu import fast_swiglu, fast_swiglus, is_llama_mlp, silu_mul, silu_mul_backward, silu_mul_forward

from conftest import (assert_same_training, count_calls, dtype_name, layouts, recompute_rebuilds, tiny_lora_llama,
                      token_ids, train_once)

transformers = pytest.importorskip("transformers")

SHAPES = [(1, 1), (3, 5), (2, 7, 17), (4, 16), (33, 37), (5, 1536), (2, 4097)]
DTYPES = [torch.float32, torch.bfloat16]


def reference(gate, up, dtype):
    """float64 ``round(round(silu(g)) · u)`` (the module's roundings to ``dtype``) and the exact gradients."""
    g, u = gate.double(), up.double()
    s = torch.sigmoid(g)
    act = (g * s).to(dtype).double()
    out = act * u

    def grads(dy):
        dy = dy.double()
        return dy * u * s * (1 + g * (1 - s)), dy * act

    return out, grads


def assert_close(name, got, exact, dtype, scale=None, rounding=None):
    """A few fp32 roundings of the terms (``scale``: their magnitude, elementwise), then one to ``dtype``
    (``rounding``: the allowance relative to each exact value, by default half a bf16 ulp with a margin)."""
    assert got.dtype == dtype and got.shape == exact.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite (an element the kernel did not write?)"
    err = (got.double() - exact).abs()
    scale = exact.abs() if scale is None else scale
    if rounding is None:
        rounding = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    allowed = 8 * 2.0**-24 * scale + exact.abs() * rounding
    worst = (err - allowed).max().item()
    assert worst <= 0, f"{name}: error {err.max().item():.3g} over the bound by {worst:.3g}"


def _inputs(shape, dtype):
    return (torch.randn(*shape) * 4).to(dtype), torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype, cpu_isa):
    gate, up = _inputs(shape, dtype)
    out = silu_mul_forward(gate, up)
    exact, grads = reference(gate, up, dtype)
    # the SiLU rounded to dtype first, as the module does: its fp32 value, a few ulps off, may round to the
    # neighbouring bf16 value in rare elements (one bf16 ulp, < 2^-7 relative), then one more rounding
    assert_close("out", out, exact, dtype, rounding=2.0**-7 + 2.0**-8 if dtype == torch.bfloat16 else None)
    if dtype == torch.bfloat16:  # and nearly always the module's very bits
        torch_ops = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)
        assert (out != torch_ops).float().mean() <= 0.01
    dy = torch.randn(*shape).to(dtype)
    dg, du = silu_mul_backward(dy, gate, up)
    dg64, du64 = grads(dy)
    g = gate.double()
    terms = (dy.double() * up.double()).abs() * (1 + g.abs())  # |dy·u·σ·(1 + g(1 − σ))| ≤ this
    assert_close("grad_gate", dg, dg64, dtype, scale=terms)
    assert_close("grad_up", du, du64, dtype)


def test_module_bits_in_bf16(cpu_isa):
    """The module's two roundings (silu(gate) to bf16, then the product): its bits but in rare elements."""
    gate, up = _inputs((64, 1536), torch.bfloat16)
    out = silu_mul_forward(gate, up)
    torch_ops = (F.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
    assert (out != torch_ops).float().mean() <= 1e-3


def test_subnormal_results_round_as_torch_rounds_them(cpu_isa):
    """Products below fp32's smallest normal (bf16 has the same range) are rounded, not flushed to zero —
    the avx512bf16 variant's one-instruction conversion flushes them, so such vectors must go the exact
    way: forward and the up gradient against torch's ops, bit for bit but in rare elements (the SiLU's own
    rounding, as above)."""
    gate, up = _inputs((16, 1536), torch.bfloat16)
    up = (up.float() * 2.0**-130).to(torch.bfloat16)
    out = silu_mul_forward(gate, up)
    act = F.silu(gate.float()).to(torch.bfloat16).float()
    torch_ops = (act * up.float()).to(torch.bfloat16)
    assert (torch_ops.float().abs() < 2.0**-126).float().mean() > 0.5 and (torch_ops != 0).float().mean() > 0.5
    assert (out != torch_ops).float().mean() <= 1e-3
    dy = (torch.randn(16, 1536) * 2.0**-128).to(torch.bfloat16)
    _, du = silu_mul_backward(dy, gate, torch.randn(16, 1536).to(torch.bfloat16))
    assert ((du != (dy.float() * act).to(torch.bfloat16)).float().mean()) <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(33, 37), (4, 16, 128)], ids=str)
def test_any_layout_gives_the_contiguous_bits(shape, dtype, cpu_isa):
    """gate, up and grad_out in any memory layout (each a view whose buffer nothing else holds, copied to
    rows by the wrapper) give the bits of contiguous arguments, forward, backward and through autograd.
    (A copy let go before the kernel read it once gave silu(up)·up, or NaN: a bf16 QLoRA MLP's gate and up
    had come back as transposed views.)"""
    gate, up = _inputs(shape, dtype)
    dy = torch.randn(*shape).to(dtype)
    want = silu_mul_forward(gate, up)
    want_dg, want_du = silu_mul_backward(dy, gate, up)
    for name, g in layouts(gate).items():
        for up_name, u in (("same", layouts(up)[name]), ("contiguous", up.clone())):
            case = f"gate {name}, up {up_name}"
            assert torch.equal(silu_mul_forward(g, u), want), case
            dg, du = silu_mul_backward(layouts(dy)[name], g, u)
            assert torch.equal(dg, want_dg) and torch.equal(du, want_du), case
            g2 = layouts(gate)[name].requires_grad_()
            u2 = (layouts(up)[name] if up_name == "same" else up.clone()).requires_grad_()
            out = silu_mul(g2, u2)
            out.backward(dy)
            assert torch.equal(out, want) and torch.equal(g2.grad, want_dg) and torch.equal(u2.grad, want_du), case


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_poisoned_outputs_strided_rows_and_extremes(dtype, cpu_isa):
    """Every output element is written (NaN-filled buffers come back finite), rows with a leading dimension
    past their width (NaN past it) are read in place, and large |gate| gives silu's limits (g, and 0)."""
    m, n = 7, 37
    gate, up = _inputs((m, n), dtype)
    gate[0, :4] = torch.tensor([100.0, -100.0, 88.5, -87.5]).to(dtype)
    big_g = torch.full((m, n + 9), float("nan"), dtype=dtype)
    big_u = torch.full((m, n + 5), float("nan"), dtype=dtype)
    big_g[:, :n], big_u[:, :n] = gate, up
    out = torch.full((m, n), float("nan"), dtype=dtype)
    _C.silu_mul_cpu(matrix("out", out), matrix("gate", big_g[:, :n]), matrix("up", big_u[:, :n]), 2)
    assert torch.equal(out, silu_mul_forward(gate, up))
    assert out[0, 0] == (gate[0, 0].float() * up[0, 0].float()).to(dtype) and abs(out[0, 1].item()) < 1e-30
    dy = torch.randn(m, n).to(dtype)
    dg = torch.full((m, n), float("nan"), dtype=dtype)
    du = torch.full((m, n), float("nan"), dtype=dtype)
    _C.silu_mul_backward_cpu(matrix("dg", dg), matrix("du", du), matrix("dy", dy), matrix("g", big_g[:, :n]),
                             matrix("u", big_u[:, :n]), 2)  # fmt: skip
    ref_dg, ref_du = silu_mul_backward(dy, gate, up)
    assert torch.equal(dg, ref_dg) and torch.equal(du, ref_du)


def test_autograd_and_bad_input():
    gate, up = _inputs((4, 9), torch.float32)
    gate.requires_grad_()
    out = silu_mul(gate, up)
    assert type(out.grad_fn).__name__ == "SiLUMulFunctionBackward"
    dy = torch.randn(4, 9)
    out.backward(dy)
    dg64, _ = reference(gate.detach(), up, torch.float32)[1](dy)
    assert torch.allclose(gate.grad.double(), dg64, rtol=1e-5, atol=1e-6)
    assert up.grad is None
    with torch.no_grad():
        assert silu_mul(gate, up).grad_fn is None
    with pytest.raises(TypeError, match="^up: expected a torch.Tensor"):
        silu_mul(gate, [1.0])
    with pytest.raises(TypeError, match="^gate: expected dtype float32, bfloat16, got float64"):
        silu_mul_forward(gate.detach().double(), up.double())
    with pytest.raises(TypeError, match="^up: expected dtype float32, got bfloat16"):
        silu_mul_forward(gate.detach(), up.bfloat16())
    with pytest.raises(ValueError, match=r"^up: expected shape \[4, 9\], got \[4, 8\]"):
        silu_mul_forward(gate.detach(), up[:, :8])
    with pytest.raises(ValueError, match=r"^grad_out: expected shape \[4, 9\]"):
        silu_mul_backward(torch.randn(4, 8), gate.detach(), up)
    with pytest.raises(ValueError, match=r"^up: expected shape \[4, 9\]"):  # the binding re-checks
        _C.silu_mul_cpu(matrix("o", out.detach()), matrix("g", gate.detach()), matrix("u", up[:, :8]), 1)
    assert silu_mul_forward(torch.randn(0, 5), torch.randn(0, 5)).shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_fast_swiglu_on_a_transformers_model(dtype, monkeypatch):
    """Both MLPs of a LoRA Llama on the kernel, the module's own forward bits (bf16: the same roundings;
    a rare one-ulp difference from the SiLU's fp32 value allowed), the same loss and adapter gradients
    within the dtype; deepcopy, pickle, ``enabled=False``."""
    base = tiny_lora_llama(dtype)
    mine = fast_swiglu(copy.deepcopy(base))
    assert fast_swiglus(mine) == 2 and fast_swiglus(base) == 0
    calls = count_calls(monkeypatch, lowrank.swiglu, "silu_mul_forward")
    ids = token_ids(3)
    x = torch.randn(2, 9, 64).to(dtype)
    with torch.no_grad():
        a, b = mine.model.layers[0].mlp(x), base.model.layers[0].mlp(x)
        assert (a != b).float().mean() < 0.02 if dtype == torch.bfloat16 else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        assert torch.allclose(mine(input_ids=ids).logits.float(), base(input_ids=ids).logits.float(), **tol)
    assert len(calls) == 3
    assert_same_training(train_once(mine, ids), train_once(base, ids), dtype)
    for copied in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
        assert fast_swiglus(copied) == 2
        mlp = copied.model.layers[1].mlp
        assert mlp.forward.args[0] is mlp
    fast_swiglu(mine, enabled=False)
    assert fast_swiglus(mine) == 0
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        fast_swiglu(None)


def test_only_silu_llama_mlps():
    """Gemma's MLP has LlamaMLP's forward with a GELU: left alone; Qwen2's copy with a SiLU is taken."""
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    gemma = GemmaMLP(transformers.GemmaConfig(hidden_size=8, intermediate_size=16))
    qwen = Qwen2MLP(transformers.Qwen2Config(hidden_size=8, intermediate_size=16))
    assert is_llama_mlp(qwen) and not is_llama_mlp(gemma)
    model = fast_swiglu(torch.nn.ModuleList([gemma, qwen]))
    assert fast_swiglus(model) == 1 and "forward" in qwen.__dict__


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_recompute_pointwise_rebuilds_the_product(dtype, monkeypatch):
    """Under recompute_pointwise the product (saved by the down projection's adapter) is rebuilt from the
    gate and up its node saved: the same loss and gradients, bit for bit, once per layer."""
    base = lowrank.fast_norm(fast_swiglu(tiny_lora_llama(dtype))).train()
    assert recompute_rebuilds(monkeypatch, base, "_silu_mul_again") == 2


def test_fast_decoder_turns_all_three_on_and_off():
    """``fast_decoder``: attention, norms and MLPs in one call (each where it applies), undone in one."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    model = lowrank.fast_decoder(tiny_lora_llama(torch.float32))
    assert lowrank.fast_decoder_report(model) == {"attention": "lowrank", "norms": 5, "mlps": 2}
    lowrank.fast_decoder(model, enabled=False)
    assert lowrank.fast_decoder_report(model) == {"attention": "sdpa", "norms": 0, "mlps": 0}
    plain = lowrank.fast_decoder(torch.nn.Sequential(Qwen2RMSNorm(8)))  # not a transformers model: no attention
    assert lowrank.fast_decoder_report(plain) == {"attention": None, "norms": 1, "mlps": 0}
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        lowrank.fast_decoder(3)


def test_without_transformers_nothing_is_patched(monkeypatch):
    """transformers is optional: without it no module is known to be LlamaRMSNorm / LlamaMLP, and
    ``fast_decoder`` leaves a model alone rather than failing."""
    import sys

    from lowrank import norm, swiglu

    class Norm(torch.nn.Module):  # a class never seen before (the answers are cached per class)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x

    monkeypatch.setattr(norm._patch, "_source", None)
    monkeypatch.setattr(swiglu._patch, "_source", None)
    monkeypatch.setitem(sys.modules, "transformers.models.llama.modeling_llama", None)  # import fails
    model = lowrank.fast_decoder(torch.nn.Sequential(Norm()))
    assert lowrank.fast_decoder_report(model)["norms"] == 0
