"""LoRALinear: a drop-in nn.Linear with a LoRA adapter (PEFT's definition), checked against float64
plain-torch math, PEFT itself where installed, and torch.compile."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank import LoRALinear
from lowrank.ops import _runtime

from conftest import absolute, assert_error_within, dtype_name, fp64, plain_lora_linear

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff


def _layer(k, n, *, r=4, alpha=8.0, dtype=torch.float32, adapter_dtype=None, bias=True, dropout=0.0, rslora=False):
    """A LoRALinear with a random (non-zero) lora_B, so the adapter contributes."""
    layer = LoRALinear(
        k, n, bias=bias, dtype=dtype, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, adapter_dtype=adapter_dtype
    )
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(n, r) * r**-0.5)
        if bias:
            layer.bias.copy_(torch.randn(n) * 0.5)
    return layer


def _plain(layer, x, adapter_input=None, cast=lambda t: t):
    """The layer's function with plain torch ops, on ``cast`` of its tensors."""
    b = None if layer.bias is None else cast(layer.bias)
    xa = None if adapter_input is None else cast(adapter_input)
    a, b_ = cast(layer.lora_A.weight), cast(layer.lora_B.weight)
    return plain_lora_linear(cast(x), cast(layer.weight), b, a, b_, layer.scaling, xa)


def _check_output(layer, x, y, adapter_input=None):
    """y (the layer's output) vs float64, within a multiple of plain PyTorch's error in the same dtypes."""
    exact = _plain(layer, x, adapter_input, fp64)
    magnitude = _plain(layer, x, adapter_input, absolute)
    assert_error_within("y", y, _plain(layer, x, adapter_input), exact, magnitude)


# ---------------------------------------------------------------------------------------------
# Drop-in for nn.Linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_name)
def test_constructor_matches_nn_linear(dtype):
    positional = LoRALinear(33, 17, False, "cpu", dtype)
    keywords = LoRALinear(in_features=33, out_features=17, bias=True, device=torch.device("cpu"), dtype=dtype)
    reference = nn.Linear(33, 17, device="cpu", dtype=dtype)
    for layer, has_bias in ((positional, False), (keywords, True)):
        assert (layer.in_features, layer.out_features) == (33, 17)
        assert layer.weight.shape == reference.weight.shape and layer.weight.dtype == dtype
        assert isinstance(layer.weight, nn.Parameter)
        assert (layer.bias is not None) == has_bias
        if has_bias:
            assert layer.bias.shape == (17,) and layer.bias.dtype == dtype
        assert layer.lora_A.weight.dtype == dtype and layer.lora_B.weight.dtype == dtype
        assert layer.lora_A.weight.shape == (8, 33) and layer.lora_B.weight.shape == (17, 8)  # default r = 8
    assert "in_features=33" in repr(keywords) and "r=8" in repr(keywords)


@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (2, 1, 3), (70,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fresh_layer_equals_base_linear(dtype, lead):
    """lora_B starts at zero: the adapter adds exactly nothing, and the output is the base linear's."""
    layer = LoRALinear(45, 23, dtype=dtype, r=4, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(*lead, 45).to(dtype)
    y = layer(x)
    assert y.shape == lead + (23,) and y.dtype == dtype
    base = nn.Linear(45, 23, dtype=dtype)
    base.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    exact = F.linear(fp64(x), fp64(layer.weight), fp64(layer.bias))
    magnitude = F.linear(absolute(x), absolute(layer.weight), absolute(layer.bias))
    assert_error_within("y", y, base(x), exact, magnitude)
    with torch.no_grad():  # with B = 0 the output does not depend on A, bit for bit
        layer.lora_A.weight.normal_()
    assert torch.equal(layer(x), y)
    before = layer.weight.detach().clone()
    layer.merge()  # merging a zero update leaves W bit for bit
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["lora_same", "lora_fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_default_init(dtype, adapter_dtype):
    """PEFT's init: lora_A Kaiming-uniform(a=√5) i.e. U(-1/√in, 1/√in); lora_B zeros."""
    layer = LoRALinear(256, 40, dtype=dtype, r=16, adapter_dtype=adapter_dtype)
    a = layer.lora_A.weight.detach().double()
    assert layer.lora_A.weight.dtype == (adapter_dtype or dtype)
    bound = 1 / math.sqrt(256)
    assert a.abs().max() <= bound * (1 + 2**-7)
    assert a.abs().max() >= 0.95 * bound  # 4096 draws: the range is filled
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(a.mean().item()) < 0.05 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    layer.reset_lora_parameters()
    assert not torch.equal(layer.lora_A.weight.double(), a)  # fresh draw


@pytest.mark.parametrize(
    "r,alpha,rslora",
    [(1, 1.0, False), (4, 8.0, False), (16, 32.0, False), (4, 8.0, True), (16, 4.0, True), (3, 5, False)],
)
def test_scaling(r, alpha, rslora):
    layer = _layer(37, 19, r=r, alpha=alpha, rslora=rslora)
    expected = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling == pytest.approx(expected, rel=1e-12)
    x = torch.randn(5, 37)
    y = layer(x)
    # y - base is s·B A x, with this s
    delta = fp64(y) - F.linear(fp64(x), fp64(layer.weight), fp64(layer.bias))
    lora = expected * fp64(x) @ fp64(layer.lora_A.weight).t() @ fp64(layer.lora_B.weight).t()
    _check_output(layer, x, y)
    assert (delta - lora).abs().max() < 1e-4 * lora.abs().max()


def test_from_linear_shares_and_freezes_weight():
    linear = nn.Linear(29, 13)
    ptr, bias_ptr = linear.weight.data_ptr(), linear.bias.data_ptr()
    layer = LoRALinear.from_linear(linear, r=4, alpha=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == ptr and layer.bias.data_ptr() == bias_ptr
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert (layer.in_features, layer.out_features) == (29, 13)
    x = torch.randn(4, 29)
    torch.testing.assert_close(layer(x), linear(x))  # fresh adapter: identity (tolerance: fp32 defaults)
    with torch.no_grad():  # a change through the original module is seen by the layer (same storage)
        linear.weight.mul_(2)
    assert torch.equal(layer.weight, linear.weight)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_from_linear_adapter_dtype_and_options():
    linear = nn.Linear(16, 8, dtype=torch.bfloat16, bias=False)
    layer = LoRALinear.from_linear(linear, r=2, alpha=3.0, dropout=0.1, use_rslora=True, adapter_dtype=torch.float32)
    assert layer.bias is None and layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert layer.scaling == pytest.approx(3.0 / math.sqrt(2))
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------
def test_nn_linear_state_dict_loads_strict():
    linear = nn.Linear(21, 11)
    layer = LoRALinear(21, 11, r=3)
    a_before = layer.lora_A.weight.detach().clone()
    result = layer.load_state_dict(linear.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.lora_A.weight, a_before) and torch.count_nonzero(layer.lora_B.weight) == 0
    assert set(linear.state_dict()) == {"weight", "bias"}


def test_nn_linear_state_dict_loads_strict_nested():
    """A model's nn.Linear checkpoint loads into the same model with LoRALinear layers."""
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    lora = nn.Sequential(LoRALinear(8, 16, r=2), nn.ReLU(), LoRALinear(16, 4, bias=False, r=2))
    lora.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), plain(x))
    keys = {"0.weight", "0.bias", "0.lora_A.weight", "0.lora_B.weight"}
    keys |= {"2.weight", "2.lora_A.weight", "2.lora_B.weight"}
    assert set(lora.state_dict()) == keys


def test_lora_state_dict_round_trip():
    src = _layer(21, 11, r=3)
    sd = src.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert sd["lora_A.weight"].shape == (3, 21) and sd["lora_B.weight"].shape == (11, 3)
    dst = LoRALinear(21, 11, r=3)
    dst.load_state_dict(sd, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(4, 21)
    assert torch.equal(dst(x), src(x))


def test_partial_adapter_state_dict_is_rejected():
    """Only a checkpoint without any adapter key is forgiven; one with half an adapter is an error."""
    sd = _layer(21, 11, r=3).state_dict()
    del sd["lora_B.weight"]
    with pytest.raises(RuntimeError, match="lora_B.weight"):
        LoRALinear(21, 11, r=3).load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["lora_same", "lora_fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_merge_unmerge(dtype, adapter_dtype):
    layer = _layer(67, 35, r=4, alpha=8, dtype=dtype, adapter_dtype=adapter_dtype)
    u = U[dtype]
    w0 = fp64(layer.weight)
    delta = fp64(layer.delta_weight())
    x = torch.randn(6, 67).to(dtype)
    y_unmerged = layer(x)

    layer.merge()
    assert layer.merged and layer.weight.dtype == dtype
    # W' is W + ΔW rounded once to the weight's dtype
    assert ((fp64(layer.weight) - (w0 + delta)).abs() <= u * (w0 + delta).abs() + 1e-30).all()
    y_merged = layer(x)
    # Both outputs are within rounding of the exact y: |err| <= u·(|x|·|W'| + |b| + |y|) summed over both,
    # with W' rounded (u·|x|·|W+ΔW|); fp32 accumulation adds K·2^-24 relative to |x|·|W| at most.
    mag = absolute(x) @ ((w0 + delta).abs()).t() + absolute(layer.bias)
    k = x.shape[-1]
    bound = (2 * u + 2 * k * 2.0**-24) * mag + u * (fp64(y_merged).abs() + fp64(y_unmerged).abs())
    assert ((fp64(y_merged) - fp64(y_unmerged)).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="merge"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    # two roundings: of W + ΔW, then of W' - ΔW
    assert ((fp64(layer.weight) - w0).abs() <= u * ((w0 + delta).abs() + w0.abs()) * (1 + 2**-20)).all()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.unmerge()
    _check_output(layer, x, layer(x))


# ---------------------------------------------------------------------------------------------
# Dropout: adapter input only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [3, 70], ids=["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_dropout_on_adapter_path_only(dtype, m):
    p = 0.4
    layer = _layer(50, 30, r=4, alpha=8, dtype=dtype, dropout=p).train()
    x = torch.randn(m, 50).to(dtype)
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)
    x_dropped = F.dropout(x, p, training=True)  # the same mask the layer drew
    assert (x_dropped == 0).any() and not torch.equal(x_dropped, x)
    _check_output(layer, x, y, adapter_input=x_dropped)  # base sees x, adapter sees dropout(x)
    # the base path did not see dropout: y - x·Wᵀ - b is exactly the adapter term of dropout(x), and
    # differs from what dropout on the whole input would give
    off_if_base_dropped = (fp64(y) - _plain(layer, x_dropped, x_dropped, fp64)).abs().max().item()
    off_as_specified = (fp64(y) - _plain(layer, x, x_dropped, fp64)).abs().max().item()
    assert off_if_base_dropped > 20 * off_as_specified

    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    _check_output(layer, x, y1)


def test_dropout_gradients_use_the_same_mask():
    layer = _layer(40, 24, r=4, alpha=8, dropout=0.3).train()
    x = torch.randn(5, 40, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x), 0.3, training=True)  # scaled keep-mask, same draws
    # float64 autograd through the same function with that mask
    ins = [fp64(t).requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    xa64 = ins[0] * fp64(mask)
    y64 = plain_lora_linear(ins[0], fp64(layer.weight), fp64(layer.bias), ins[1], ins[2], layer.scaling, xa64)
    y64.backward(fp64(dy))
    grads = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for name, got, exact in zip(("x", "lora_A", "lora_B"), grads, ins):
        err = (fp64(got) - exact.grad).abs().max()
        assert err <= 1e-5 * exact.grad.abs().max(), f"grad {name}: error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# Training: what is trainable, what moves
# ---------------------------------------------------------------------------------------------
def test_only_lora_parameters_require_grad():
    for layer in (LoRALinear(8, 4, r=2), LoRALinear.from_linear(nn.Linear(8, 4), r=2), LoRALinear(8, 4, r=2, bias=False)):
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"lora_A.weight", "lora_B.weight"}
        frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
        assert frozen == ({"weight", "bias"} if layer.bias is not None else {"weight"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_optimizer_step_changes_only_lora_parameters(dtype):
    layer = LoRALinear(32, 16, r=4, alpha=8, dtype=dtype)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)  # every parameter handed over; frozen ones have no grad
    x = torch.randn(6, 32).to(dtype)

    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    # lora_B is zero, so the first gradient reaching lora_A (s·Bᵀ dy xᵀ) is exactly zero
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0
    opt.step()
    opt.zero_grad()
    assert torch.equal(layer.weight, before["weight"]) and torch.equal(layer.bias, before["bias"])
    assert not torch.equal(layer.lora_B.weight, before["lora_B.weight"])

    layer(x).square().sum().backward()
    opt.step()
    assert torch.equal(layer.weight, before["weight"]) and torch.equal(layer.bias, before["bias"])
    assert not torch.equal(layer.lora_A.weight, before["lora_A.weight"])


@pytest.mark.parametrize("lead", [(1,), (5,), (70,), (2, 3)], ids=["M1", "M5", "M70", "2x3"])
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-lora_fp32"],
)
def test_gradients_vs_fp64(dtype, adapter_dtype, lead):
    """y and the gradients of x, lora_A, lora_B vs float64 autograd through plain torch ops; the
    tolerance is the error of the same plain ops in the layer's dtypes."""
    layer = _layer(129, 67, r=5, alpha=10, dtype=dtype, adapter_dtype=adapter_dtype)
    x = torch.randn(*lead, 129).to(dtype)
    dy = torch.randn(*lead, 67).to(dtype)

    def run(cast, use_layer):
        if use_layer:
            xx = x.clone().requires_grad_()
            y = layer(xx)
            y.backward(dy)
            grads = [xx.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
            layer.zero_grad()
            return [y] + grads
        xx, a, b = (cast(t).detach().requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight))
        y = plain_lora_linear(xx, cast(layer.weight), cast(layer.bias), a, b, layer.scaling)
        y.backward(cast(dy))
        return [y, xx.grad, a.grad, b.grad]

    got, same_dtype, exact, magnitude = run(None, True), run(lambda t: t, False), run(fp64, False), run(absolute, False)
    for name, g, s, e, mag in zip(("y", "grad_x", "grad_lora_A", "grad_lora_B"), got, same_dtype, exact, magnitude):
        assert g.dtype == s.dtype
        assert_error_within(name, g, s, e, mag)


def test_inference_mode_and_no_grad():
    layer = _layer(16, 8)
    x = torch.randn(3, 16)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)


def test_deepcopy():
    layer = _layer(16, 8)
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 16)
    assert torch.equal(clone(x), layer(x))
    assert clone.weight.data_ptr() != layer.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    layer = LoRALinear(16, 8, r=2)
    with pytest.raises(ValueError, match="weight|x"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="weight|x"):
        layer(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x"):
        layer(torch.randint(0, 3, (3, 16)))


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="x"):
        LoRALinear(16, 8, r=2)([1.0] * 16)


@pytest.mark.parametrize("r", [0, -1, 2.0, True, None], ids=str)
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r"):
        LoRALinear(16, 8, r=r)
    with pytest.raises(ValueError, match="r"):
        LoRALinear.from_linear(nn.Linear(16, 8), r=r)


def test_bad_alpha_and_dropout():
    with pytest.raises(TypeError, match="alpha"):
        LoRALinear(16, 8, alpha="8")
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            LoRALinear(16, 8, dropout=p)


# ---------------------------------------------------------------------------------------------
# PEFT interop: same A/B -> same outputs and gradients
# ---------------------------------------------------------------------------------------------
def _peft_linear(base, r, alpha, use_rslora):
    pytest.importorskip("peft")
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    kw = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora)
    if "config" in inspect.signature(PeftLoraLinear.__init__).parameters:  # peft >= 0.18 takes a LoraConfig
        from peft import LoraConfig

        return PeftLoraLinear(base, adapter_name="default", config=LoraConfig(**kw), r=r, lora_alpha=alpha)
    return PeftLoraLinear(base, adapter_name="default", **kw)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("lead", [(3,), (70,), (2, 5)], ids=["M3", "M70", "2x5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_matches_peft(dtype, lead, use_rslora):
    r, alpha = 4, 12
    base = nn.Linear(65, 33, dtype=dtype)
    peft_layer = _peft_linear(copy.deepcopy(base), r, alpha, use_rslora)
    ours = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=use_rslora)
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    with torch.no_grad():
        ours.lora_A.weight.copy_(torch.randn(r, 65) * 65**-0.5)
        ours.lora_B.weight.copy_(torch.randn(33, r))
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(*lead, 65).to(dtype)
    dy = torch.randn(*lead, 33).to(dtype)

    def run(module, a, b):
        xx = x.clone().requires_grad_()
        y = module(xx)
        y.backward(dy)
        return [y, xx.grad, a.grad, b.grad]

    got = run(ours, ours.lora_A.weight, ours.lora_B.weight)
    theirs = run(peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    xs = [fp64(t).requires_grad_() for t in (x, ours.lora_A.weight, ours.lora_B.weight)]
    y64 = plain_lora_linear(xs[0], fp64(base.weight), fp64(base.bias), xs[1], xs[2], ours.scaling)
    y64.backward(fp64(dy))
    exact = [y64, xs[0].grad, xs[1].grad, xs[2].grad]
    ys = [absolute(t) for t in (x, ours.lora_A.weight, ours.lora_B.weight)]
    mag = plain_lora_linear(ys[0], absolute(base.weight), absolute(base.bias), ys[1], ys[2], ours.scaling)
    # only y's magnitude is used for the floor; gradients use their own scale
    for i, name in enumerate(("y", "grad_x", "grad_lora_A", "grad_lora_B")):
        assert_error_within(name, got[i], theirs[i], exact[i], mag if i == 0 else None)


def test_peft_state_dict_names_match():
    """Adapter keys are PEFT's (lora_A / lora_B, [r, in] / [out, r]) once the adapter name is dropped."""
    base = nn.Linear(20, 10)
    peft_layer = _peft_linear(copy.deepcopy(base), 4, 8, False)
    ours = LoRALinear.from_linear(base, r=4, alpha=8)
    peft_keys = {
        k.replace(".default", "").replace("base_layer.", ""): v.shape for k, v in peft_layer.state_dict().items()
    }
    assert peft_keys == {k: v.shape for k, v in ours.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(_layer(16, 32, r=4, alpha=8), nn.ReLU(), _layer(32, 8, r=2, alpha=4, bias=False))
    compiled = torch.compile(model, fullgraph=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4

    def run(fn, x, dy):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(dy)
        return [y.detach(), xx.grad] + [p.grad.clone() for p in trainable]

    def exact_run(x, dy):
        h = x
        xs = fp64(x).requires_grad_()
        params = []
        h = xs
        for m in model:
            if isinstance(m, LoRALinear):
                a, b = fp64(m.lora_A.weight).requires_grad_(), fp64(m.lora_B.weight).requires_grad_()
                params += [a, b]
                h = plain_lora_linear(h, fp64(m.weight), fp64(m.bias), a, b, m.scaling)
            else:
                h = m(h)
        h.backward(fp64(dy))
        return [h.detach(), xs.grad] + [p.grad for p in params]

    for lead in ((5,), (2, 3)):  # the second shape recompiles with dynamic sizes through the fake kernels
        x, dy = torch.randn(*lead, 16), torch.randn(*lead, 8)
        got, eager, exact = run(compiled, x, dy), run(model, x, dy), exact_run(x, dy)
        for i, (g, e, ex) in enumerate(zip(got, eager, exact)):
            assert_error_within(f"{lead} output/grad {i}", g, e, ex)


# ---------------------------------------------------------------------------------------------
# Inference calls reuse the layer's kernel views (ops/lora.py FrozenOperands): never stale
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)], ids=str)
def test_inference_views_give_the_op_bits(dtype, lead, force_path):
    """The eager inference call (views built once per layer) computes exactly what the registered op
    computes on the same tensors, on the fused path and the GEMM path."""
    for path in ("fused", "gemm"):
        force_path(path)
        layer = _layer(40, 24, r=3, dtype=dtype)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        x = torch.randn(*lead, 40).to(dtype)
        with torch.no_grad():
            want, _ = torch.ops.lowrank.lora_linear_forward(x, layer.weight, layer.bias, layer.lora_A.weight,
                                                            layer.lora_B.weight, layer.scaling, None)  # fmt: skip
            for _ in range(2):  # the second call reuses the views
                assert torch.equal(layer(x), want)


def test_inference_views_follow_the_tensors(force_path):
    """Replaced data (``.data =``, an optimizer step, ``.to()``, a new Parameter, a copy) is what the
    next inference call reads: the views are rebuilt whenever pointer, shape, strides, dtype or device
    change, and values changed in place are read where they are."""
    force_path("fused")
    layer = _layer(32, 16, r=2)
    x = torch.randn(3, 32)

    def check(lay, inp):
        with torch.no_grad():
            got = lay(inp)
            want = F.linear(inp.float(), lay.weight.float() + lay.delta_weight(), lay.bias.float())
        torch.testing.assert_close(got.float(), want, rtol=2e-2 if inp.dtype == torch.bfloat16 else 1e-5,
                                   atol=2e-2 if inp.dtype == torch.bfloat16 else 1e-5)  # fmt: skip

    check(layer, x)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # in place: same views, new values
    check(layer, x)
    layer.weight.data = torch.randn(16, 32)  # new storage
    check(layer, x)
    layer.lora_A.weight = nn.Parameter(torch.randn(2, 32))  # a new Parameter
    check(layer, x)
    with torch.no_grad():
        layer.weight.data = (2 * layer.weight.data).t().contiguous().t()  # new values, transposed strides
    check(layer, x)
    twin = copy.deepcopy(layer)  # a copy starts without views and reads its own tensors
    with torch.no_grad():
        twin.weight.zero_()
    check(twin, x)
    check(layer, x)
    layer.to(torch.bfloat16)
    check(layer, x.bfloat16())
    with pytest.raises(TypeError, match="^weight: expected dtype float32, got bfloat16"):
        with torch.no_grad():
            layer(x)  # an fp32 input to the now-bf16 layer: the op's own error, not stale views


# ---------------------------------------------------------------------------------------------
# The few-token training shortcut: the layer's kernel views built once, the whole backward in one
# lora_backward_cpu call (ops/lora.py: forward_train_fast, _backward_fast)
# ---------------------------------------------------------------------------------------------
def _grads_fp64(layer, x, gy):
    w, b = fp64(layer.weight), fp64(layer.bias)
    a, bb = fp64(layer.lora_A.weight), fp64(layer.lora_B.weight)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    x64 = fp64(x).requires_grad_(True)
    y = F.linear(x64, w, b) + layer.scaling * F.linear(F.linear(x64, a), bb)
    return torch.autograd.grad(y, (x64, a, bb), fp64(gy))


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 2), (11,)], ids=str)
@pytest.mark.parametrize("dtype,dot", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-widen", "bfloat16-dot"])  # fmt: skip
def test_few_token_training_shortcut(dtype, dot, lead, force_path, adapter_products, monkeypatch, kernel_calls):
    force_path("fused")
    adapter_products(True)  # (the shortcut computes them with the kernel: taken only where that is the choice)
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_BF16_DOT", dot)  # a bf16 dy read as bf16 in dx, or widened
    layer = LoRALinear(45, 23, dtype=dtype, r=5, alpha=10)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    for _ in range(2):  # the second call reuses the views the first built
        kernel_calls.clear()
        x = torch.randn(*lead, 45 + 3)[..., 1:46].to(dtype).requires_grad_(True)  # strided rows
        gy = torch.randn(*lead, 23).to(dtype)
        got = torch.autograd.grad(layer(x), (x, layer.lora_A.weight, layer.lora_B.weight), gy)
        exact = _grads_fp64(layer, x.detach(), gy)
        for name, g, e in zip(("x", "lora_A", "lora_B"), got, exact):  # fp32 sums, one rounding to dtype
            assert g.dtype == dtype and g.shape == e.shape, name
            assert torch.allclose(g.double(), e, rtol=U[dtype], atol=1e-5 * e.abs().max().item()), name
        assert kernel_calls[-2:] == ["lora_fused_cpu", "lora_backward_cpu"], kernel_calls


def test_few_token_training_shortcut_not_where_adapter_products_go_to_gemms(force_path, adapter_products, kernel_calls):
    """The shortcut computes the adapter's gradients with lowrank's kernel: where this machine chose GEMMs
    for them it is not taken, so an eager call gives the bits of the op registry's path."""
    force_path("fused")
    adapter_products(False)
    layer = LoRALinear(16, 8, r=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = torch.randn(2, 16, requires_grad=True)
    torch.autograd.grad(layer(x).sum(), (x, layer.lora_A.weight))
    assert "lora_backward_cpu" not in kernel_calls and "lora_fused_cpu" in kernel_calls, kernel_calls


def test_few_token_training_shortcut_after_data_assignment(force_path, kernel_calls):
    """A weight replaced between forward and backward (``.data =``): the backward does not use views of
    the old memory; it takes the usual path, on the tensors autograd saved."""
    force_path("fused")
    layer = LoRALinear(16, 8, r=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = torch.randn(2, 16, requires_grad=True)
    y = layer(x)
    new_a = torch.randn(4, 16)
    layer.lora_A.weight.data = new_a  # new storage: the forward's views are stale
    kernel_calls.clear()
    gy = torch.randn(2, 8)
    gx, = torch.autograd.grad(y, x, gy)
    assert "lora_backward_cpu" not in kernel_calls
    # autograd saved the parameter itself, which now holds new_a: the usual path's dx uses it
    w, b = fp64(layer.weight), fp64(layer.lora_B.weight)
    expected = fp64(gy) @ w + layer.scaling * (fp64(gy) @ b) @ fp64(new_a)
    assert torch.allclose(gx.double(), expected, rtol=1e-5, atol=1e-5)


def test_few_token_training_shortcut_not_with_dropout_or_trainable_weight(force_path, kernel_calls):
    force_path("fused")
    layer = LoRALinear(16, 8, r=4, alpha=4, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = torch.randn(2, 16, requires_grad=True)
    torch.autograd.grad(layer(x).sum(), x)
    assert "lora_backward_cpu" not in kernel_calls
    plain = LoRALinear(16, 8, r=4, alpha=4)
    plain.weight.requires_grad_(True)
    kernel_calls.clear()
    gw, = torch.autograd.grad(plain(x).sum(), plain.weight)
    assert "lora_backward_cpu" not in kernel_calls and torch.allclose(gw, torch.ones(8, 1) * x.detach().sum(0))


def test_lora_backward_cpu_refuses_bad_shapes():
    from lowrank import _C
    from lowrank._validate import matrix as M

    m, n, k, r = 2, 6, 5, 3
    t = {name: torch.randn(*shape) for name, shape in dict(
        dx=(m, k), grad_a=(r, k), grad_b=(n, r), g=(m, r), dy=(m, n), xa=(m, k), u=(m, r), w=(n, k), a=(r, k),
        b=(n, r)).items()}  # fmt: skip
    order = ("dx", "grad_a", "grad_b", "g", "dy", "xa", "u", "w", "a", "b")
    _C.lora_backward_cpu(*(M(name, t[name]) for name in order), 1.0, 1)  # well-formed: runs
    for name, bad in (("xa", (m, k + 1)), ("u", (m + 1, r)), ("b", (n, r + 1)), ("w", (n + 1, k)), ("dx", (m, k - 1)),
                      ("grad_a", (r, k + 1))):  # fmt: skip
        args = [M(nm, torch.randn(*bad) if nm == name else t[nm]) for nm in order]
        with pytest.raises(ValueError, match="expected shape"):
            _C.lora_backward_cpu(*args, 1.0, 1)
