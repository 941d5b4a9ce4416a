"""ops/_gemm.py's fp32 GEMM choice (``cpu_fp32_gemm``): torch.mm's or oneDNN's, whichever this machine
measured the faster. Both engines must give fp32-accurate products for every operand layout the
callers pass (a weight or its transposed view, a slice with a leading dimension, a term added into the
accumulator), and whole layers must match float64 whichever engine runs."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.ops import _dispatch, _gemm, _runtime

from conftest import FLOOR_ROUNDINGS, FP32_UNIT_ROUNDOFF, assert_error_within

ENGINES = ["torch"] + (["onednn"] if _gemm.onednn_available() else [])


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setattr(_runtime, "CPU_FP32_GEMM", request.param)
    return request.param


def _bound(a: torch.Tensor, b_t: torch.Tensor, add=None) -> float:
    """FLOOR_ROUNDINGS fp32 roundings of the largest |term| sum (conftest's floor): what any fp32 GEMM
    may err by at these sizes."""
    mag = a.double().abs() @ b_t.double().abs().t()
    if add is not None:
        mag = mag + add.double().abs()
    return FLOOR_ROUNDINGS * FP32_UNIT_ROUNDOFF * mag.max().item()


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (37, 129, 65), (300, 576, 200)])
def test_linear_and_mm_match_float64(engine, m, k, n):
    x = torch.randn(m, k)
    w_big = torch.randn(n + 3, k + 5)
    w = w_big[1 : n + 1, 2 : k + 2]  # a slice: leading dimension k + 5
    bias, add = torch.randn(n), torch.randn(m, n)
    exact = x.double() @ w.double().t()
    for got, want, term in [
        (_gemm.linear(x, w), exact, None),
        (_gemm.linear(x, w, bias=bias), exact + bias.double(), bias.expand(m, n)),
        (_gemm.linear(x, w, add=add), exact + add.double(), add),
        (_gemm.linear(x, w, bias=bias, add=add), exact + bias.double() + add.double(), add + bias),
    ]:
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= _bound(x, w, term), engine
    dy = torch.randn(m, n)
    term = torch.randn(m, k)
    got = _gemm.mm(dy, w, add=term)  # dy W through W's transposed view, plus a term
    assert (got.double() - (dy.double() @ w.double() + term.double())).abs().max().item() <= _bound(dy, w.t(), term)
    got = _gemm.mm(dy.t(), x)  # a weight gradient's product: both operands transposed views
    assert (got.double() - dy.double().t() @ x.double()).abs().max().item() <= _bound(dy.t(), x.t())


def test_empty_and_other_dtypes_fall_back_to_torch(engine):
    assert _gemm.linear(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)
    assert torch.equal(_gemm.linear(torch.randn(2, 0), torch.randn(3, 0)), torch.zeros(2, 3))
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(_gemm.linear(x, w), x @ w.t())
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(_gemm.linear(xb, wb), torch.mm(xb, wb.t()))


@pytest.mark.parametrize("kind", ["lora", "vera", "qlora"])
def test_layers_many_tokens_match_float64_either_engine(engine, kind, monkeypatch):
    """A layer's fp32 training step on the GEMM path (forward, input and parameter gradients) against the
    same layer in float64, with each engine."""
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {torch.float32: 0, torch.bfloat16: 0})
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_MAX_M", {torch.float32: 0, torch.bfloat16: 0})
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 0)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", 0)
    dense = torch.nn.Linear(192, 320)
    if kind == "lora":
        layer = lowrank.LoRALinear.from_linear(dense, r=8, alpha=16)
    elif kind == "vera":
        layer = lowrank.VeRALinear.from_linear(dense, r=64)
    else:
        layer = lowrank.QLoRALinear.from_linear(dense, r=8, alpha=16)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(3, 100, 192)
    grad_y = torch.randn(3, 100, 320)

    def step(module, inp):
        inp = inp.clone().requires_grad_()
        y = module(inp)
        y.backward(grad_y.to(y.dtype))
        grads = [inp.grad] + [p.grad for p in module.parameters() if p.requires_grad]
        return [y.detach()] + grads

    got = step(layer, x)
    exact = step(_float64_twin(layer, kind), x.double())
    plain32 = step(_float64_twin(layer, kind, torch.float32), x)  # torch's own fp32 formula: the yardstick
    for name, g, e, p in zip(["y", "grad_x", "param 0", "param 1", "param 2"], got, exact, plain32):
        assert_error_within(f"{kind} {engine} {name}", g, p, e)


def _float64_twin(layer, kind, dtype=torch.float64):
    """The same layer as plain torch ops in ``dtype`` (y = x Wᵀ + b + the adapter term), its trainable
    parameters in the layer's order."""
    from torch import nn

    w = layer.dequantize(torch.float32) if kind == "qlora" else layer.weight.detach()
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    values = dict(layer.named_parameters())

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w.to(dtype))
            self.register_buffer("b", layer.bias.detach().to(dtype))
            self.ps = nn.ParameterList([nn.Parameter(values[n].detach().to(dtype)) for n in names])

        def forward(self, x):
            p = dict(zip(names, self.ps))
            y = x @ self.w.t() + self.b
            if kind == "vera":
                k, n = x.shape[-1], self.w.shape[0]
                va, vb = layer.vera_A[:, :k].to(dtype), layer.vera_B[:n].to(dtype)
                return y + ((x @ va.t()) * p["vera_lambda_d"]) @ vb.t() * p["vera_lambda_b"]
            return y + layer.scaling * ((x @ p["lora_A.weight"].t()) @ p["lora_B.weight"].t())

    return Twin()


def test_probe_chooses_and_records(fresh_decisions):
    value, timings = _dispatch._probe_fp32_gemm()
    assert value in ("torch", "onednn")
    if not _gemm.onednn_available():
        assert value == "torch" and timings == {}
    else:
        (t,) = timings.values()
        assert set(t) == {"torch", "onednn", "sets"}
        assert value == min(("torch", "onednn"), key=t.get)


@pytest.fixture
def fresh_decisions(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_dispatch, "_decisions", {})


@pytest.mark.parametrize("bias", [True, False])
def test_dense_linear_matches_float64_either_engine(engine, bias):
    """Full fine-tuning's layer product (adapters/layer.py's FullDelta): forward, dx, dW and db."""
    x = torch.randn(3, 70, 96, requires_grad=True)
    w = torch.randn(130, 96, requires_grad=True)
    b = torch.randn(130, requires_grad=True) if bias else None
    gy = torch.randn(3, 70, 130)
    leaves = [t for t in (x, w, b) if t is not None]
    y = _gemm.dense_linear(x, w, b)
    assert (type(y.grad_fn).__name__ == "DenseLinearFunctionBackward") == (engine == "onednn")  # else F.linear
    got = [y.detach()] + list(torch.autograd.grad(y, leaves, gy))
    plain_y = torch.nn.functional.linear(x, w, b)
    plain = [plain_y.detach()] + list(torch.autograd.grad(plain_y, leaves, gy))
    d = [t.detach().double().requires_grad_() for t in leaves]
    exact_y = torch.nn.functional.linear(*d) if bias else torch.nn.functional.linear(d[0], d[1])
    exact = [exact_y.detach()] + list(torch.autograd.grad(exact_y, d, gy.double()))
    for name, g, p, e in zip(["y", "dx", "dW", "db"], got, plain, exact):
        assert_error_within(f"{engine} {name}", g, p, e)


def test_head_loss_matches_float64_either_engine(engine):
    """The fused head loss (lowrank/loss.py) makes each chunk's logits and the hidden state's gradient
    with the measured fp32 GEMM: loss and gradient against float64."""
    from lowrank import loss

    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(1000, 64) * 0.1
    labels = torch.randint(0, 1000, (300,))
    labels[::7] = -100
    got = loss.HeadLossFunction.apply(h, w, None, labels, -100, 1.0 / 300)
    (g,) = torch.autograd.grad(got, h)
    hd = h.detach().double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(hd @ w.double().t(), labels, ignore_index=-100, reduction="sum") / 300
    (gd,) = torch.autograd.grad(exact, hd)
    hp = h.detach().clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(hp @ w.t(), labels, ignore_index=-100, reduction="sum") / 300
    (gp,) = torch.autograd.grad(plain, hp)
    assert_error_within(f"{engine} loss", got.detach().reshape(1), plain.detach().reshape(1), exact.detach().reshape(1))
    assert_error_within(f"{engine} grad", g, gp, gd)


@pytest.mark.skipif(not _gemm.onednn_available(), reason="this torch has no oneDNN")
def test_onednn_gets_dense_operands(monkeypatch):
    """oneDNN's fast kernels take densely stored matrices (row- or column-major): a weight slice with a
    longer leading dimension ran 2500x slower (a reference loop), so such operands are copied first."""
    monkeypatch.setattr(_runtime, "CPU_FP32_GEMM", "onednn")
    seen = []

    def dense(t):
        return t.is_contiguous() or t.t().is_contiguous()

    def spy(op):
        def call(x, *args):
            w = args[1] if op is _gemm._LINEAR_ADD else args[0]
            seen.append((dense(x), dense(w)))
            return op(x, *args)

        return call

    monkeypatch.setattr(_gemm, "_LINEAR", spy(_gemm._LINEAR))
    monkeypatch.setattr(_gemm, "_LINEAR_ADD", spy(_gemm._LINEAR_ADD))
    a = torch.randn(40, 100)[:, :64]  # slices: leading dimension 100
    w = torch.randn(30, 100)[:, :64]
    exact = a.double() @ w.double().t()
    for got in (_gemm.linear(a, w), _gemm.linear(a, w, add=torch.zeros(40, 30)), _gemm.mm(a, w.t())):
        assert (got.double() - exact).abs().max().item() <= _bound(a, w)
    assert seen == [(True, True)] * 3


def test_dense_linear_double_backward_raises(engine):
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    y = _gemm.dense_linear(x, w)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    if engine == "onednn":
        with pytest.raises(RuntimeError):  # an error, never a silently wrong second derivative
            torch.autograd.grad(gx.sum(), w)
    else:  # F.linear: twice differentiable
        (gw,) = torch.autograd.grad(gx.sum(), w)
        assert gw.shape == w.shape


@pytest.mark.parametrize("direct", [True, False], ids=["into-rows", "buffer"])
def test_linear_tiles_into_matches_float64_either_engine(engine, direct, monkeypatch):
    """``linear_tiles(..., into=c)``: ``c + x Wᵀ`` written into ``c``, ``c`` entering each tile's GEMM as
    its accumulator (oneDNN's sum post-op, addmm's C), over many row tiles (a short last one), with the
    products straight into c's columns or into a transposed buffer."""
    monkeypatch.setattr(_gemm, "_TILE_FLOATS", 1)  # -> 16-row tiles
    monkeypatch.setattr(_runtime, "CPU_TILE_BUFFER_MAX_M", {torch.float32: 0 if direct else 1 << 20})
    m, k, n = 37, 129, 70
    x, w, c = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    exact = x.double() @ w.double().t() + c.double()
    into = c.clone()
    y = _gemm.linear_tiles(x, n, k, lambda n0, tile: tile.copy_(w[n0 : n0 + tile.shape[0]]), into=into)
    assert y.data_ptr() == into.data_ptr() and y.is_contiguous()
    assert (y.double() - exact).abs().max().item() <= _bound(x, w, c)
    with pytest.raises(ValueError, match="bias"):
        _gemm.linear_tiles(x, n, k, lambda n0, tile: None, bias=torch.zeros(n), into=into)
