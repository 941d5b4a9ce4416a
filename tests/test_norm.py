"""RMSNorm on lowrank's CPU kernels (lowrank/norm.py, csrc/cpu/pointwise.cpp) against a float64 reference
on fresh random inputs and odd widths (not a whole vector, one element, rows with a leading dimension past
their width), forward and backward, every CPU kernel variant; outputs poisoned before the kernel writes
them; bad input; and ``fast_norm`` on a transformers model against its own LlamaRMSNorm."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lowrank
from lowrank import _C
from lowrank._validate import matrix
from lowrank.norm import fast_norm, fast_norms, is_llama_rms_norm, rms_norm, rms_norm_backward, rms_norm_forward

from conftest import (assert_same_training, count_calls, dtype_name, layouts, recompute_rebuilds, tiny_lora_llama,
                      token_ids, train_once)

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

SHAPES = [(1, 1), (3, 5), (2, 7, 17), (4, 16), (33, 37), (5, 576), (3, 1000), (2, 4097)]
DTYPES = [torch.float32, torch.bfloat16]


def reference(x, weight, eps, dtype):
    """The module's function in float64, with its two roundings to ``dtype`` (x·r, then the product with
    weight), and the exact derivative: ``(out, dx(dy), dw(dy))``."""
    xd, wd = x.double(), weight.double()
    r = (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    n = (xd * r).to(dtype).double()  # the module rounds x·r before the product
    out = wd * n

    def grads(dy):
        """(dx, dw, and the magnitudes of the terms each sums: the scale of their fp32 rounding)"""
        g = dy.double() * wd
        c = r * r * (g * xd).mean(-1, keepdim=True)
        dx = r * (g - xd * c)
        dw = (dy.double() * n).reshape(-1, x.shape[-1]).sum(0)
        dx_terms = (r * (g.abs() + (xd * c).abs() + (g * xd).abs().mean(-1, keepdim=True) * r * r * xd.abs())).max()
        dw_terms = (dy.double() * n).abs().reshape(-1, x.shape[-1]).sum(0).max()
        return dx, dw, dx_terms.item(), dw_terms.item()

    return out, grads


def assert_close(name, got, exact, dtype, rel_sums=2e-6, scale=None, rounding=None):
    """fp32 sums (a few fp32 roundings of ``scale``, the magnitude of the summed terms: by default the
    largest exact value), then one rounding to ``dtype`` (``rounding``: the allowance relative to each
    exact value, by default half an ulp with a margin)."""
    assert got.dtype == dtype and got.shape == exact.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite (an element the kernel did not write?)"
    err = (got.double() - exact).abs()
    scale = exact.abs().max().item() if scale is None else scale
    if rounding is None:
        rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-22
    allowed = rel_sums * scale + exact.abs() * rounding
    worst = (err - allowed).max().item()
    assert worst <= 0, f"{name}: error {err.max().item():.3g} over the bound by {worst:.3g}"


def _inputs(shape, dtype):
    x = (torch.randn(*shape) * 3 + 0.5).to(dtype)
    w = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype, cpu_isa):
    x, w = _inputs(shape, dtype)
    eps = 1e-5
    out, rstd = rms_norm_forward(x, w, eps)
    exact, grads = reference(x, w, eps, dtype)
    # Each element within its own tolerance (no share of the largest): rounded twice, as the module does,
    # x·r from an fp32 r a few ulps off, which in bf16 may round one ulp (< 2^-7) away, then the product.
    rounding = 2.0**-7 + 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    assert_close("out", out, exact, dtype, rel_sums=0, rounding=rounding)
    r64 = (x.double().pow(2).mean(-1) + eps).rsqrt().reshape(-1)
    assert torch.allclose(rstd.double(), r64, rtol=2e-6, atol=0)
    dy = torch.randn(*shape).to(dtype)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    dx64, dw64, dx_scale, dw_scale = grads(dy)
    assert_close("grad_x", dx, dx64, dtype, scale=dx_scale)
    assert_close("grad_weight", dw, dw64, dtype, rel_sums=2e-6 * max(1, x.numel() // shape[-1]) ** 0.5, scale=dw_scale)
    dx_only, none = rms_norm_backward(dy, x, w, rstd, need_weight=False)
    assert none is None and torch.equal(dx_only, dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(33, 37), (4, 16, 576)], ids=str)
def test_any_layout_gives_the_contiguous_bits(shape, dtype, cpu_isa):
    """x and grad_out in any memory layout (views whose buffers nothing else holds, copied to rows by the
    wrapper) give the bits of contiguous arguments, forward, backward and through autograd."""
    x, w = _inputs(shape, dtype)
    dy = torch.randn(*shape).to(dtype)
    want, want_rstd = rms_norm_forward(x, w, 1e-6)
    want_dx, want_dw = rms_norm_backward(dy, x, w, want_rstd)
    for name, xv in layouts(x).items():
        out, rstd = rms_norm_forward(xv, w, 1e-6)
        assert torch.equal(out, want) and torch.equal(rstd, want_rstd), name
        dx, dw = rms_norm_backward(layouts(dy)[name], xv, w, rstd)
        assert torch.equal(dx, want_dx) and torch.equal(dw, want_dw), name
        x2, w2 = layouts(x)[name].requires_grad_(), w.clone().requires_grad_()
        out = rms_norm(x2, w2, 1e-6)
        out.backward(layouts(dy)[name])
        assert torch.equal(out, want) and torch.equal(x2.grad, want_dx) and torch.equal(w2.grad, want_dw), name


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_poisoned_outputs_and_strided_rows(dtype, cpu_isa):
    """Every output element is written (NaN-filled buffers come back finite); rows whose leading dimension
    is longer than their width (NaN past it) are read in place."""
    m, h = 9, 37
    big = torch.full((m, h + 11), float("nan"), dtype=dtype)
    x, w = _inputs((m, h), dtype)
    big[:, :h] = x
    xs = big[:, :h]
    out = torch.full((m, h), float("nan"), dtype=dtype)
    rstd = torch.full((m,), float("nan"))
    _C.rms_norm_cpu(matrix("out", out), matrix("x", xs), matrix("weight", w), matrix("rstd", rstd), 1e-6, 2)
    ref_out, ref_rstd = rms_norm_forward(x, w, 1e-6)
    assert torch.equal(out, ref_out) and torch.equal(rstd, ref_rstd)
    dy = torch.randn(m, h).to(dtype)
    dx = torch.full((m, h), float("nan"), dtype=dtype)
    dw = torch.full((h,), float("nan"), dtype=dtype)
    _C.rms_norm_backward_cpu(matrix("dx", dx), matrix("dw", dw), matrix("dy", dy), matrix("x", xs), matrix("w", w),
                             matrix("rstd", rstd), 2)  # fmt: skip
    ref_dx, ref_dw = rms_norm_backward(dy, x, w, ref_rstd)
    assert torch.equal(dx, ref_dx) and torch.equal(dw, ref_dw)


def test_threads_do_not_change_the_bits():
    x, w = _inputs((300, 576), torch.bfloat16)
    dy = torch.randn(300, 576).bfloat16()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, rstd = rms_norm_forward(x, w, 1e-6)
            results.append((out, rstd, *rms_norm_backward(dy, x, w, rstd)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # (the weight gradient's partial sums: rows per task do not depend on threads)


def test_empty_and_autograd():
    x = torch.randn(0, 8)
    out, rstd = rms_norm_forward(x, torch.ones(8), 1e-6)
    assert out.shape == (0, 8) and rstd.shape == (0,)
    x, w = _inputs((4, 6), torch.float64)
    x, w = x.requires_grad_(), w.requires_grad_()
    with pytest.raises(TypeError, match="^x: expected dtype float32, bfloat16, got float64"):
        rms_norm(x, w)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    out = rms_norm(x32, w32, 1e-6)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "RMSNormFunctionBackward"
    dy = torch.randn(4, 6)
    out.backward(dy)
    exact, grads = reference(x32.detach(), w32.detach(), 1e-6, torch.float32)
    dx64, dw64, dx_scale, dw_scale = grads(dy)
    assert_close("grad_x", x32.grad, dx64, torch.float32, scale=dx_scale)
    assert_close("grad_weight", w32.grad, dw64, torch.float32, scale=dw_scale)
    with torch.no_grad():
        assert rms_norm(x32, w32, 1e-6).grad_fn is None


def test_bad_input_names_the_argument():
    x, w = _inputs((3, 8), torch.float32)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        rms_norm_forward([1.0], w, 1e-6)
    with pytest.raises(TypeError, match="^weight: expected a torch.Tensor"):
        rms_norm(x.requires_grad_(), None)
    x = x.detach()
    with pytest.raises(TypeError, match="^weight: expected dtype float32, got bfloat16"):
        rms_norm_forward(x, w.bfloat16(), 1e-6)
    with pytest.raises(ValueError, match=r"^weight: expected shape \[8\], got \[7\]"):
        rms_norm_forward(x, w[:7], 1e-6)
    with pytest.raises(ValueError, match=r"^x: expected at least one dimension"):
        rms_norm_forward(torch.tensor(1.0), torch.ones(1), 1e-6)
    for eps in (-1.0, float("nan"), True, "1e-6"):
        with pytest.raises(ValueError, match="^eps: expected a number >= 0"):
            rms_norm_forward(x, w, eps)
    out, rstd = rms_norm_forward(x, w, 1e-6)
    with pytest.raises(ValueError, match=r"^grad_out: expected shape \[3, 8\]"):
        rms_norm_backward(torch.randn(3, 7), x, w, rstd)
    with pytest.raises(ValueError, match=r"^rstd: expected shape \[3\]"):
        rms_norm_backward(torch.randn(3, 8), x, w, rstd[:2])
    # the binding re-checks what it is given
    with pytest.raises(ValueError, match=r"^weight: expected shape \[1, 8\]"):
        _C.rms_norm_cpu(matrix("o", out), matrix("x", x), matrix("w", w[:4]), matrix("r", rstd), 1e-6, 1)
    with pytest.raises(ValueError, match="^eps: expected a number >= 0"):
        _C.rms_norm_cpu(matrix("o", out), matrix("x", x), matrix("w", w), matrix("r", rstd), -1.0, 1)
    with pytest.raises(ValueError, match="^out: expected x's dtype"):
        _C.rms_norm_cpu(matrix("o", out.bfloat16()), matrix("x", x), matrix("w", w), matrix("r", rstd), 1e-6, 1)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [576, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_same_function_as_llama_rms_norm(dtype, h, cpu_isa):
    """The module's outputs (bf16: at most one ulp away, in few elements; fp32: within a few ulps, from r's
    summation order) and, within the bounds above, its gradients; a width with a partial vector too."""
    module = LlamaRMSNorm(h, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(h) * 0.5 + 1)
    x = (torch.randn(4, 33, h) * 2).to(dtype).requires_grad_()
    dy = torch.randn(4, 33, h).to(dtype)
    ref = module(x)
    ref.backward(dy)
    ref_dx, ref_dw = x.grad, module.weight.grad
    x.grad = module.weight.grad = None
    fast_norm(module)
    out = module(x)
    out.backward(dy)
    if dtype == torch.bfloat16:
        differ = out != ref
        assert differ.float().mean() < 1e-3
        assert ((out.float() - ref.float()).abs()[differ] <= ref.float().abs()[differ] * 2.0**-7).all()
    else:
        assert torch.allclose(out, ref, rtol=2.0**-20, atol=0)
    bf16 = dtype == torch.bfloat16
    loose = dict(rtol=2e-2, atol=2e-2 * ref_dx.abs().max().item()) if bf16 else dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad.float(), ref_dx.float(), **loose)
    loose_w = dict(rtol=2e-2, atol=2e-2 * ref_dw.abs().max().item()) if bf16 else dict(rtol=1e-5, atol=1e-4)
    assert torch.allclose(module.weight.grad.float(), ref_dw.float(), **loose_w)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_fast_norm_on_a_transformers_model(dtype, monkeypatch):
    """Every norm of a LoRA Llama on the kernel (5: two per layer and the last), the same logits, loss and
    adapter gradients as the model's own norms; it survives deepcopy and pickle; ``enabled=False`` undoes
    it; an fp16 input goes to the module's own ops."""
    base = tiny_lora_llama(dtype)
    mine = fast_norm(copy.deepcopy(base))
    assert fast_norms(mine) == 5 and fast_norms(base) == 0
    calls = count_calls(monkeypatch, lowrank.norm, "rms_norm_forward")
    ids = token_ids(3)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(mine(input_ids=ids).logits.float(), base(input_ids=ids).logits.float(), **tol)
    assert len(calls) == 5
    assert_same_training(train_once(mine, ids), train_once(base, ids), dtype)
    for copied in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
        assert fast_norms(copied) == 5
        norm = copied.model.norm
        assert norm.forward.args[0] is norm  # bound to the copy, not to the original
    assert fast_norm(mine) is mine and fast_norms(mine) == 5  # twice: the same
    calls.clear()
    with torch.no_grad():
        mine.model.norm(torch.randn(2, 64).half())  # not a dtype the kernel takes: the module's own ops
    assert not calls
    fast_norm(mine, enabled=False)
    assert fast_norms(mine) == 0 and "forward" not in mine.model.norm.__dict__
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        fast_norm("a model")


def test_only_llama_rms_norms():
    """A norm with another forward (Gemma's ``1 + weight``) keeps its own; one that copies Llama's does not."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert is_llama_rms_norm(LlamaRMSNorm(8)) and is_llama_rms_norm(Qwen2RMSNorm(8))
    assert not is_llama_rms_norm(GemmaRMSNorm(8)) and not is_llama_rms_norm(torch.nn.LayerNorm(8))
    model = torch.nn.Sequential(GemmaRMSNorm(8), Qwen2RMSNorm(8))
    fast_norm(model)
    assert fast_norms(model) == 1 and "forward" in model[1].__dict__


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_recompute_pointwise_rebuilds_the_norms(dtype, monkeypatch):
    """Under recompute_pointwise a fast norm's output is rebuilt from what its node saved, not stored: the
    same loss and gradients, bit for bit, each norm rebuilt in the backward."""
    base = fast_norm(tiny_lora_llama(dtype)).train()
    rebuilt = recompute_rebuilds(monkeypatch, base, "_rms_norm_again")
    # Rebuilt: the norms whose output an adapter saves and that have a node. The first layer's first norm
    # reads the frozen embedding (nothing to differentiate: no node, its output is stored); the last feeds
    # the frozen head, which saves no input.
    assert rebuilt == 3
