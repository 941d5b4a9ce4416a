"""VeRALinear: a drop-in nn.Linear with a VeRA adapter (PEFT's definition), checked against float64
plain-torch math, PEFT itself where installed, and torch.compile; shared projections drawn as PEFT
draws them; a base layer with no dense weight (the path NF4Linear takes)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank import VeRALinear, vera_shared_projections

from conftest import absolute, assert_error_within, dtype_name, fp64


def _layer(k, n, *, r=4, dtype=torch.float32, adapter_dtype=None, bias=True, dropout=0.0, projections=None):
    """A VeRALinear with random (non-zero) d and b, so the adapter contributes."""
    layer = VeRALinear(k, n, bias=bias, dtype=dtype, r=r, dropout=dropout, projections=projections,
                       adapter_dtype=adapter_dtype)
    _randomize(layer)
    return layer


def _randomize(layer):
    with torch.no_grad():
        layer.vera_lambda_d.copy_(torch.randn(layer.r))
        layer.vera_lambda_b.copy_(torch.randn(layer.out_features))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.out_features) * 0.5)
    return layer


def plain_vera(x, weight, bias, vera_a, vera_b, d, b, adapter_input=None):
    """PEFT's forward with plain torch ops: base + b ⊙ F.linear(d ⊙ F.linear(x_a, A_s), B_s)."""
    xa = x if adapter_input is None else adapter_input
    base = F.linear(x, weight, bias)
    return base + (b * F.linear(d * F.linear(xa.to(vera_a.dtype), vera_a), vera_b)).to(base.dtype)


def _plain(layer, x, adapter_input=None, cast=lambda t: t):
    a, bb = layer.projection_slices()
    bias = None if layer.bias is None else cast(layer.bias)
    xa = None if adapter_input is None else cast(adapter_input)
    return plain_vera(cast(x), cast(layer.weight), bias, cast(a), cast(bb), cast(layer.vera_lambda_d),
                      cast(layer.vera_lambda_b), xa)


def _check_output(layer, x, y, adapter_input=None):
    exact = _plain(layer, x, adapter_input, fp64)
    magnitude = _plain(layer, x, adapter_input, absolute)
    assert_error_within("y", y, _plain(layer, x, adapter_input), exact, magnitude)


# ---------------------------------------------------------------------------------------------
# Shared projections: PEFT's draw, bit for bit, in any process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [0, 1234])
def test_projections_match_peft_bit_for_bit(key):
    pytest.importorskip("peft")
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(key)
    peft_a = _kaiming_init((16, 300), generator=generator)
    peft_b = _kaiming_init((500, 16), generator=generator)
    a, b = vera_shared_projections(16, 300, 500, key)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, peft_a) and torch.equal(b, peft_b)


def test_projections_identical_in_another_process():
    code = (
        "import torch, lowrank, sys; a, b = lowrank.vera_shared_projections(8, 70, 90, 7); "
        "sys.stdout.write(torch.cat([a.flatten(), b.flatten()]).double().numpy().tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    a, b = vera_shared_projections(8, 70, 90, 7)
    assert out == torch.cat([a.flatten(), b.flatten()]).double().numpy().tobytes().hex()


def test_projections_are_kaiming_uniform_and_keyed():
    a, b = vera_shared_projections(32, 400, 600, 0)
    assert a.abs().max() <= (6 / 400) ** 0.5 and b.abs().max() <= (6 / 32) ** 0.5
    assert a.abs().max() > 0.9 * (6 / 400) ** 0.5  # spread over the whole interval
    a1, _ = vera_shared_projections(32, 400, 600, 1)
    assert not torch.equal(a, a1)


def test_layer_default_projections_come_from_the_key():
    layer = VeRALinear(30, 20, r=5, projection_prng_key=3)
    a, b = vera_shared_projections(5, 30, 20, 3)
    assert torch.equal(layer.vera_A, a) and torch.equal(layer.vera_B, b)


def test_projections_are_buffers_without_gradients():
    layer = _layer(12, 10, r=3)
    assert {n for n, _ in layer.named_buffers()} == {"vera_A", "vera_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["vera_lambda_d", "vera_lambda_b"]
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(4, 12)).square().sum().backward()
    opt.step()
    after = layer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vera_lambda_d", "vera_lambda_b"}
    assert len(opt.state) == 2


# ---------------------------------------------------------------------------------------------
# Drop-in for nn.Linear; fresh adapter is the identity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_name)
def test_constructor_and_fresh_layer_equals_base(dtype):
    torch.manual_seed(1)
    ref = nn.Linear(33, 17, dtype=dtype)
    torch.manual_seed(1)
    layer = VeRALinear(33, 17, dtype=dtype, r=8)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert layer.vera_lambda_d.dtype == dtype and torch.all(layer.vera_lambda_d == torch.tensor(0.1, dtype=dtype))
    assert torch.all(layer.vera_lambda_b == 0) and layer.vera_A.shape == (8, 33) and layer.vera_B.shape == (17, 8)
    for lead in ((1,), (5,), (2, 3)):
        x = torch.randn(*lead, 33, dtype=dtype)
        with torch.no_grad():
            _check_output(layer, x, layer(x))
            exact = fp64(x) @ fp64(ref.weight).t() + fp64(ref.bias)  # b = 0: the base layer alone
            assert_error_within("y", layer(x), ref(x), exact, absolute(x) @ absolute(ref.weight).t() + absolute(ref.bias))


def test_from_linear_shares_and_freezes_weight():
    base = nn.Linear(10, 6)
    layer = VeRALinear.from_linear(base, r=3, d_initial=0.5)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.all(layer.vera_lambda_d == 0.5)
    assert layer.base_layer is None


@pytest.mark.parametrize("m", [1, 7, 100])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-vera_fp32"])
def test_forward_and_gradients_vs_fp64(dtype, adapter_dtype, m):
    layer = _layer(129, 67, r=20, dtype=dtype, adapter_dtype=adapter_dtype)
    x = torch.randn(m, 129).to(dtype).requires_grad_()
    dy = torch.randn(m, 67).to(dtype)
    y = layer(x)
    y.backward(dy)
    got = [y, x.grad, layer.vera_lambda_d.grad, layer.vera_lambda_b.grad]

    def plain(cast):
        xx = cast(x).detach().requires_grad_()
        d, b = cast(layer.vera_lambda_d).detach().requires_grad_(), cast(layer.vera_lambda_b).detach().requires_grad_()
        a, bb = layer.projection_slices()
        yy = plain_vera(xx, cast(layer.weight), cast(layer.bias), cast(a), cast(bb), d, b)
        yy.backward(cast(dy))
        return [yy, xx.grad, d.grad, b.grad]

    for name, g, s, e in zip(["y", "grad_x", "grad_d", "grad_b"], got, plain(lambda t: t), plain(fp64)):
        assert_error_within(name, g, s, e)


def test_layers_of_different_sizes_share_one_pair():
    a, b = vera_shared_projections(6, 50, 70, 0)
    sizes = [(50, 70), (20, 70), (50, 9), (33, 41)]
    layers = [_layer(k, n, r=6, projections=(a, b)) for k, n in sizes]
    model = nn.Sequential(*layers)
    for layer, (k, n) in zip(layers, sizes):
        assert layer.vera_A is a and layer.vera_B is b
        sa, sb = layer.projection_slices()
        assert sa.data_ptr() == a.data_ptr() and sb.data_ptr() == b.data_ptr()  # views, no copies
        assert sa.shape == (6, k) and sb.shape == (n, 6)
        x = torch.randn(4, k)
        with torch.no_grad():
            _check_output(layer, x, layer(x))
    model.to(torch.bfloat16)
    assert all(layer.vera_A is layers[0].vera_A and layer.vera_B is layers[0].vera_B for layer in layers)
    assert layers[0].vera_A.dtype == torch.bfloat16
    copied = copy.deepcopy(model)
    assert copied[0].vera_A is copied[3].vera_A and copied[0].vera_A is not layers[0].vera_A


def test_smaller_rank_uses_the_leading_rows():
    a, b = vera_shared_projections(8, 20, 20, 0)
    layer = _layer(20, 15, r=5, projections=(a, b))
    sa, sb = layer.projection_slices()
    assert torch.equal(sa, a[:5, :20]) and torch.equal(sb, b[:15, :5])
    x = torch.randn(3, 20)
    with torch.no_grad():
        _check_output(layer, x, layer(x))


def test_bad_projections():
    a, b = vera_shared_projections(4, 10, 10, 0)
    with pytest.raises(ValueError, match="projections\\[0\\]"):
        VeRALinear(11, 10, r=4, projections=(a, b))
    with pytest.raises(ValueError, match="projections\\[1\\]"):
        VeRALinear(10, 11, r=4, projections=(a, b))
    with pytest.raises(ValueError, match="r=5"):
        VeRALinear(10, 10, r=5, projections=(a, b))
    with pytest.raises(TypeError, match="projections"):
        VeRALinear(10, 10, r=4, projections=a)
    with pytest.raises(TypeError, match="one dtype"):
        VeRALinear(10, 10, r=4, projections=(a, b.double()))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_rank(bad):
    with pytest.raises(ValueError, match="r"):
        VeRALinear(4, 4, r=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dropout"):
        VeRALinear(4, 4, r=2, dropout=1.0)
    with pytest.raises(TypeError, match="d_initial"):
        VeRALinear(4, 4, r=2, d_initial="0.1")
    with pytest.raises(TypeError, match="in_features"):
        VeRALinear.from_linear(nn.ReLU(), r=2)
    with pytest.raises(ValueError, match="r"):
        vera_shared_projections(0, 4, 4)
    layer = VeRALinear(4, 3, r=2)
    with pytest.raises(ValueError, match="weight"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x"):
        layer([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(2, 4, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Merge, dropout, state dicts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_merge_unmerge(dtype):
    layer = _layer(40, 30, r=6, dtype=dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 40, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        expected = (w0.double() + layer.delta_weight().double())
        assert (layer.weight.double() - expected).abs().max() <= 2 * expected.abs().max() * 2.0**-8
        torch.testing.assert_close(layer(x), y, rtol=0.05 if dtype == torch.bfloat16 else 1e-5, atol=0.05 if dtype == torch.bfloat16 else 1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()
    # Two roundings of W's dtype at the magnitude of W + ΔW.
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    assert (layer.weight.double() - w0.double()).abs().max() <= 2 * unit * expected.abs().max()


def test_delta_weight_is_pefts_formula():
    layer = _layer(9, 7, r=3)
    a, b = layer.projection_slices()
    expected = (layer.vera_lambda_b[:, None] * b) @ (layer.vera_lambda_d[:, None] * a)
    torch.testing.assert_close(layer.delta_weight(), expected.detach())


def test_dropout_on_adapter_path_only():
    layer = _layer(30, 20, r=4, dropout=0.5)
    x = torch.randn(8, 30)
    layer.eval()
    with torch.no_grad():
        _check_output(layer, x, layer(x))
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xa = layer.vera_dropout(x)
    _check_output(layer, x, y.detach(), adapter_input=xa)


def test_state_dict_names_and_save_projection():
    layer = _layer(12, 10, r=3)
    assert set(layer.state_dict()) == {"weight", "bias", "vera_lambda_d", "vera_lambda_b", "vera_A", "vera_B"}
    lean = VeRALinear(12, 10, r=3, save_projection=False)
    assert set(lean.state_dict()) == {"weight", "bias", "vera_lambda_d", "vera_lambda_b"}
    # Regenerated from the key on load: a fresh layer with the same key has the same projections.
    lean.load_state_dict(layer.state_dict(), strict=False)
    restored = VeRALinear(12, 10, r=3, save_projection=False)
    restored.load_state_dict(lean.state_dict())
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), layer(x))


def test_state_dict_round_trip_and_base_only_checkpoint():
    layer = _layer(12, 10, r=3)
    other = VeRALinear(12, 10, r=3, projection_prng_key=9)
    other.load_state_dict(layer.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in layer.state_dict().items())
    fresh = VeRALinear(12, 10, r=3)
    fresh.load_state_dict(nn.Linear(12, 10).state_dict())  # strict: the adapter stays fresh
    with pytest.raises(RuntimeError, match="vera_lambda_b"):
        fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "vera_lambda_b"})


# ---------------------------------------------------------------------------------------------
# PEFT parity
# ---------------------------------------------------------------------------------------------
def _peft_vera(base, vera_a, vera_b, r, dropout=0.0):
    pytest.importorskip("peft")
    from peft import VeraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera.layer import Linear

    config = VeraConfig(r=r, vera_dropout=dropout)
    # persistent=True: what VeraModel does with save_projection=True (the default)
    vera_a, vera_b = BufferDict({"default": vera_a}, persistent=True), BufferDict({"default": vera_b}, persistent=True)
    return Linear(base, vera_a, vera_b, "default", config, r=r)


@pytest.mark.parametrize("lead", [(1,), (6,), (2, 40)], ids=["M1", "M6", "3d-M80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_name)
def test_matches_peft(dtype, lead):
    a, b = vera_shared_projections(8, 64, 48, 0, dtype=dtype)
    base = nn.Linear(40, 48, dtype=dtype)
    ours = _randomize(VeRALinear.from_linear(copy.deepcopy(base), r=8, projections=(a, b)))
    theirs = _peft_vera(copy.deepcopy(base).requires_grad_(False), a, b, r=8).to(dtype)
    with torch.no_grad():
        theirs.vera_lambda_d["default"].copy_(ours.vera_lambda_d)
        theirs.vera_lambda_b["default"].copy_(ours.vera_lambda_b)
        theirs.base_layer.bias.copy_(ours.bias)
    x = torch.randn(*lead, 40, dtype=dtype)
    dy = torch.randn(*lead, 48, dtype=dtype)

    def run(layer, d, bvec):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(dy)
        return y.detach(), xx.grad, d.grad, bvec.grad

    got = run(ours, ours.vera_lambda_d, ours.vera_lambda_b)
    want = run(theirs, theirs.vera_lambda_d["default"], theirs.vera_lambda_b["default"])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("y", "grad_x", "grad_d", "grad_b"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=name)


def test_fresh_layer_matches_fresh_peft_layer():
    pytest.importorskip("peft")
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(0)
    pa, pb = _kaiming_init((4, 24), generator=generator), _kaiming_init((30, 4), generator=generator)
    base = nn.Linear(24, 30)
    theirs = _peft_vera(copy.deepcopy(base), pa, pb, r=4)
    ours = VeRALinear.from_linear(copy.deepcopy(base), r=4)  # default key 0, exactly this layer's size
    assert torch.equal(ours.vera_A, pa) and torch.equal(ours.vera_B, pb)
    assert torch.equal(ours.vera_lambda_d, theirs.vera_lambda_d["default"])
    assert torch.equal(ours.vera_lambda_b, theirs.vera_lambda_b["default"])


def test_peft_state_dict_names_match():
    a, b = vera_shared_projections(4, 16, 12, 0)
    base = nn.Linear(16, 12)
    theirs = _peft_vera(copy.deepcopy(base), a, b, r=4)
    ours = VeRALinear.from_linear(copy.deepcopy(base), r=4, projections=(a, b))
    peft_keys = {k.replace(".default", "").replace("base_layer.", ""): v.shape for k, v in theirs.state_dict().items()}
    assert peft_keys == {k: v.shape for k, v in ours.state_dict().items()}
    # A PEFT layer's state dict (keys renamed) loads into ours and gives the same output.
    with torch.no_grad():
        theirs.vera_lambda_b["default"].normal_()
    ours.load_state_dict({k.replace(".default", "").replace("base_layer.", ""): v for k, v in theirs.state_dict().items()})
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


# ---------------------------------------------------------------------------------------------
# A base layer with no dense weight (the generic path NF4Linear takes)
# ---------------------------------------------------------------------------------------------
class StandInQuantizedLinear(nn.Module):
    """Stands in for NF4Linear: ``in_features``/``out_features``, a non-float ``weight`` (codes), and a
    forward that computes the frozen base product from them."""

    def __init__(self, k, n, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = k, n
        self.register_buffer("weight", torch.randint(0, 255, (n, k), dtype=torch.uint8))
        self.register_buffer("scale", torch.tensor(0.01, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(n, dtype=dtype) * 0.1)
        self.calls = 0

    def dequantize(self):
        return (self.weight.to(self.scale.dtype) - 127.5) * self.scale

    def forward(self, x):
        self.calls += 1
        return F.linear(x, self.dequantize(), self.bias)


@pytest.mark.parametrize("m", [1, 5, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_generic_base_layer(dtype, m):
    base = StandInQuantizedLinear(70, 50, dtype=dtype)
    layer = _randomize(VeRALinear.from_linear(base, r=6))
    assert layer.base_layer is base and layer.weight is None and not base.bias.requires_grad
    assert layer.vera_lambda_d.dtype == dtype
    x = torch.randn(m, 70).to(dtype).requires_grad_()
    dy = torch.randn(m, 50).to(dtype)
    y = layer(x)
    y.backward(dy)
    assert base.calls == 1

    def plain(cast):
        xx = cast(x).detach().requires_grad_()
        d, b = cast(layer.vera_lambda_d).detach().requires_grad_(), cast(layer.vera_lambda_b).detach().requires_grad_()
        a, bb = layer.projection_slices()
        yy = plain_vera(xx, cast(base.dequantize()), cast(base.bias), cast(a), cast(bb), d, b)
        yy.backward(cast(dy))
        return [yy, xx.grad, d.grad, b.grad]

    got = [y, x.grad, layer.vera_lambda_d.grad, layer.vera_lambda_b.grad]
    # The base output is rounded once by the base layer, then the adapter term added: one extra rounding.
    for name, g, s, e in zip(["y", "grad_x", "grad_d", "grad_b"], got, plain(lambda t: t), plain(fp64)):
        assert_error_within(name, g, s, e, factor=4.0)


def test_generic_base_layer_cannot_merge():
    layer = VeRALinear.from_linear(StandInQuantizedLinear(8, 6), r=2)
    with pytest.raises(TypeError, match="StandInQuantizedLinear has no dense weight|no dense weight"):
        layer.merge()
    with pytest.raises(TypeError, match="no dense weight"):
        layer.unmerge()
    assert "base_layer" in dict(layer.named_children())
    assert {k for k in layer.state_dict()} == {
        "base_layer.weight", "base_layer.scale", "base_layer.bias", "vera_lambda_d", "vera_lambda_b", "vera_A", "vera_B"
    }


# ---------------------------------------------------------------------------------------------
# torch.compile, inference modes
# ---------------------------------------------------------------------------------------------
def test_inference_mode_and_no_grad():
    layer = _layer(16, 8, r=3)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        y1 = layer(x)
    with torch.no_grad():
        y2 = layer(x)
    torch.testing.assert_close(y1, y2)
    _check_output(layer, x, y2)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a, b = vera_shared_projections(4, 32, 32, 0)
    model = nn.Sequential(_layer(16, 32, r=4, projections=(a, b)), nn.ReLU(), _layer(32, 8, r=4, bias=False, projections=(a, b)))
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
        h = xs = fp64(x).requires_grad_()
        params = []
        for m in model:
            if isinstance(m, VeRALinear):
                d, bv = fp64(m.vera_lambda_d).requires_grad_(), fp64(m.vera_lambda_b).requires_grad_()
                params += [d, bv]
                sa, sb = m.projection_slices()
                h = plain_vera(h, fp64(m.weight), fp64(m.bias), fp64(sa), fp64(sb), d, bv)
            else:
                h = m(h)
        h.backward(fp64(dy))
        return [h.detach(), xs.grad] + [p.grad for p in params]

    for lead in ((5,), (2, 3)):
        x, dy = torch.randn(*lead, 16), torch.randn(*lead, 8)
        got, eager, exact = run(compiled, x, dy), run(model, x, dy), exact_run(x, dy)
        for i, (g, e, ex) in enumerate(zip(got, eager, exact)):
            assert_error_within(f"{lead} output/grad {i}", g, e, ex)


def test_exported_from_package():
    assert {"VeRALinear", "VeRALinearFunction", "vera_shared_projections"} <= set(lowrank.__all__)
    assert "VeRALinear" in lowrank.layers.__all__


# ---------------------------------------------------------------------------------------------
# VeRA over a 4-bit NF4 base (no peer offers this)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_vera_over_nf4_base(dtype, m):
    import lowrank

    dense = torch.nn.Linear(128, 72)
    base = lowrank.NF4Linear.from_linear(dense, compute_dtype=dtype).to(dtype)
    layer = _randomize(VeRALinear.from_linear(base, r=8, adapter_dtype=dtype))
    assert layer.base_layer is base and layer.weight is None
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"vera_lambda_d", "vera_lambda_b"}
    x = torch.randn(m, 128).to(dtype).requires_grad_()
    dy = torch.randn(m, 72).to(dtype)
    y = layer(x)
    y.backward(dy)

    def plain(cast):
        xx = cast(x).detach().requires_grad_()
        d, b = cast(layer.vera_lambda_d).detach().requires_grad_(), cast(layer.vera_lambda_b).detach().requires_grad_()
        a, bb = layer.projection_slices()
        w = base.dequantize(torch.float32)  # the exact decode, then the caller's dtype
        yy = plain_vera(xx, cast(w.to(xx.dtype)), cast(base.bias), cast(a), cast(bb), d, b)
        yy.backward(cast(dy))
        return [yy, xx.grad, d.grad, b.grad]

    got = [y, x.grad, layer.vera_lambda_d.grad, layer.vera_lambda_b.grad]
    # grad_d and grad_b are sums over the M tokens: their rounding floor is a unit roundoff of the sum of
    # the terms' magnitudes, not of the (cancelling) result's
    a64, b64 = (fp64(t) for t in layer.projection_slices())
    h = (fp64(x) @ a64.t()).abs()
    dyb = fp64(dy).abs() * fp64(layer.vera_lambda_b).abs()
    magnitudes = [None, None, (h * (dyb @ b64.abs())).sum(0),
                  (fp64(dy).abs() * ((h * fp64(layer.vera_lambda_d).abs()) @ b64.abs().t())).sum(0)]  # fmt: skip
    for name, g, s, e, mag in zip(["y", "grad_x", "grad_d", "grad_b"], got, plain(lambda t: t), plain(fp64), magnitudes):
        assert_error_within(name, g, s, e, mag, factor=4.0)
    with pytest.raises(TypeError, match="no dense weight"):
        layer.merge()
    # the 4-bit base keeps bitsandbytes' keys under base_layer., the adapter PEFT's names
    keys = set(layer.state_dict())
    assert {"base_layer.weight", "base_layer.weight.absmax", "vera_lambda_d", "vera_lambda_b"} <= keys
