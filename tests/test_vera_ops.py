"""The VeRA ops (torch.ops.lowrank.vera_linear_*) against float64, on random data over odd shapes.

    y = x Wᵀ + bias + b ⊙ ((d ⊙ (x_a A_sᵀ)) B_sᵀ),   h = x_a A_sᵀ (fp32)
    A_s = A[:r, :K], B_s = B[:N, :r]: slices (views, row stride > row length) of larger shared projections

Every comparison is precision-derived (conftest.assert_error_within): the kernel's largest error
against float64 may be at most a small multiple of the error the pure-PyTorch reference
(lowrank.ops.vera_linear_*_reference) makes in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import _C
from lowrank.ops import vera as vera_ops

from conftest import (HAS_CUDA, absolute, assert_error_within, device_dtype_params, dtype_name, fp64,
                      same_dtype_reference, took_native_16bit_gemm)

forward = torch.ops.lowrank.vera_linear_forward
backward_adapter = torch.ops.lowrank.vera_linear_backward_adapter
ROW_KERNELS = {"lora_rows_cpu", "lora_fused_cpu", "lora_rows_cuda"}  # lora_fused_cpu: h and the rows in one call


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ---------------------------------------------------------------------------------------------
def _randn(*shape, dtype, device="cpu", std=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(device=device, dtype=dtype)


def make_inputs(lead, k, n, r, dtype, *, device="cpu", adapter_dtype=None, bias=True, dropout=False,
                with_weight=True, x_layout="contiguous", extra=(3, 5)):
    """(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input). The projections are the
    top-left slices of larger "shared" ones ([r + extra0, K + extra1] and [N + extra1, r + extra0]),
    so their leading dimensions exceed their row lengths, as in a model with several layer sizes."""
    adapter_dtype = adapter_dtype or dtype
    lead = tuple(lead)
    if x_layout == "transposed":
        x = _randn(k, *lead, dtype=dtype, device=device).t()
    elif x_layout == "row_slice":
        x = _randn(*lead, k + 13, dtype=dtype, device=device)[:, 5 : k + 5]
    else:
        x = _randn(*lead, k, dtype=dtype, device=device)
    weight = _randn(n, k, dtype=dtype, device=device, std=max(k, 1) ** -0.5) if with_weight else None
    b = _randn(n, dtype=dtype, device=device, std=0.5) if bias else None
    shared_a = _randn(r + extra[0], k + extra[1], dtype=adapter_dtype, device=device, std=max(k, 1) ** -0.5)
    shared_b = _randn(n + extra[1], r + extra[0], dtype=adapter_dtype, device=device, std=r**-0.5)
    vera_a, vera_b = shared_a[:r, :k], shared_b[:n, :r]
    lambda_d = _randn(r, dtype=adapter_dtype, device=device)
    lambda_b = _randn(n, dtype=adapter_dtype, device=device)
    adapter_input = F.dropout(x, p=0.25, training=True) if dropout else None
    return x, weight, b, vera_a, vera_b, lambda_d, lambda_b, adapter_input


def vera_forward_fp64(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input=None):
    """The exact answer for the given (already rounded) inputs: ``(y, h)`` in float64."""
    xa = fp64(x if adapter_input is None else adapter_input)
    h = xa @ fp64(vera_a).t()
    y = ((h * fp64(lambda_d)) @ fp64(vera_b).t()) * fp64(lambda_b)
    if weight is not None:
        y = y + fp64(x) @ fp64(weight).t()
    if bias is not None:
        y = y + fp64(bias)
    return y, h


def check_forward(*args):
    y, h = forward(*args)
    y_ref, h_ref = vera_ops.vera_linear_forward_reference(*args)
    y64, h64 = vera_forward_fp64(*args)
    y_mag, h_mag = vera_forward_fp64(*map(absolute, args))
    x = args[0]
    assert y.device == x.device and h.dtype == vera_ops._h_dtype(x.dtype) and y.dtype == x.dtype
    native16 = took_native_16bit_gemm(x, args[1])
    y_ref = same_dtype_reference(y_ref, plain_vera_linear(*args), y64, native16)
    # torch's 16-bit GEMM path rounds bias + adapter term once before the GEMM adds it: one rounding more
    assert_error_within("y", y, y_ref, y64, y_mag, extra_roundings=int(native16))
    assert_error_within("h", h, h_ref, h64, h_mag)
    return y, h


# ---------------------------------------------------------------------------------------------
# Forward: shapes x dtypes x ranks x both paths
# ---------------------------------------------------------------------------------------------
MS = (1, 2, 5, 16, 17, 65, 200)
SHAPES = ((1, 7, True), (7, 33, False), (33, 129, True), (257, 1000, False), (1000, 3, True))
RANKS = (1, 3, 16, 33)
M_PATHS = [(m, p) for m in MS for p in ("fused", "gemm")]


@pytest.mark.parametrize("k,n,bias", SHAPES, ids=[f"{k}x{n}-{'bias' if b else 'nobias'}" for k, n, b in SHAPES])
@pytest.mark.parametrize("r", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("m,path", M_PATHS, ids=[f"M{m}-{p}" for m, p in M_PATHS])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_forward_matches_fp64(device, dtype, m, path, r, k, n, bias, force_path, kernel_calls):
    force_path(path)
    check_forward(*make_inputs((m,), k, n, r, dtype, device=device, bias=bias))
    assert bool(ROW_KERNELS.intersection(kernel_calls)) == (path == "fused"), kernel_calls


def _adapter_dtype_params():
    out = []
    for p in device_dtype_params():
        device, dtype = p.values
        out.append(pytest.param(device, dtype, dtype, marks=p.marks, id=f"{p.id}-vera_same"))
        if dtype != torch.float32:
            out.append(pytest.param(device, dtype, torch.float32, marks=p.marks, id=f"{p.id}-vera_fp32"))
    return out


VARIANTS = {
    "plain": dict(),
    "dropout": dict(dropout=True),
    "no_weight": dict(with_weight=False),
    "no_weight_dropout_nobias": dict(with_weight=False, dropout=True, bias=False),
    "x_transposed": dict(x_layout="transposed"),
    "x_row_slice": dict(x_layout="row_slice"),
}
VARIANT_M_PATHS = [(1, "fused"), (5, "fused"), (200, "fused"), (5, "gemm"), (200, "gemm")]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m,path", VARIANT_M_PATHS, ids=[f"M{m}-{p}" for m, p in VARIANT_M_PATHS])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_forward_variants_match_fp64(device, dtype, adapter_dtype, m, path, variant, force_path, kernel_calls):
    force_path(path)
    inputs = make_inputs((m,), 131, 67, 5, dtype, device=device, adapter_dtype=adapter_dtype, **VARIANTS[variant])
    y, h = check_forward(*inputs)
    assert y.shape == (m, 67) and h.shape == (m, 5)
    assert bool(ROW_KERNELS.intersection(kernel_calls)) == (path == "fused"), kernel_calls


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_forward_3d_and_1d_inputs(dtype, path, force_path):
    force_path(path)
    x, w, b, a, bb, d, lb, _ = make_inputs((2, 3), 45, 23, 4, dtype)
    y, h = check_forward(x, w, b, a, bb, d, lb, None)
    assert y.shape == (2, 3, 23) and h.shape == (2, 3, 4)
    y, h = check_forward(x[0, 0], w, b, a, bb, d, lb, None)
    assert y.shape == (23,) and h.shape == (4,)


def test_forward_reads_projection_slices_in_place(kernel_calls, force_path):
    """The fused path hands the kernel the slices' pointers and leading dimensions: no copies."""
    force_path("fused")
    x, w, b, a, bb, d, lb, _ = make_inputs((3,), 40, 30, 6, torch.float32)
    seen = []
    original = _C.lora_fused_cpu

    def spy(out, x_, w_, bias, a_, e, h, col_scale, v_scale, scale, threads):
        seen.append((w_.ld, a_.ld, e.ld))
        return original(out, x_, w_, bias, a_, e, h, col_scale, v_scale, scale, threads)

    _C.lora_fused_cpu = spy
    try:
        check_forward(x, w, b, a, bb, d, lb, None)
    finally:
        _C.lora_fused_cpu = original
    # one call makes h = x A_sᵀ and the rows, reading both slices through their leading dimensions
    assert seen == [(w.stride(0), a.stride(0), bb.stride(0))]
    assert a.stride(0) > a.shape[1] and bb.stride(0) > bb.shape[1]


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 140),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    r=st.integers(1, 40),
    dtypes=st.sampled_from([(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]),
    path=st.sampled_from(["fused", "gemm"]),
    bias=st.booleans(),
    dropout=st.booleans(),
    with_weight=st.booleans(),
)
def test_forward_random_shapes(m, k, n, r, dtypes, path, bias, dropout, with_weight, force_path):
    force_path(path)
    dtype, adapter_dtype = dtypes
    check_forward(*make_inputs((m,), k, n, r, dtype, adapter_dtype=adapter_dtype, bias=bias, dropout=dropout,
                               with_weight=with_weight))


ISA_MS = (1, 3, 4, 7, 70)
ISA_SHAPES = ((17, 9), (300, 37))


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("k,n", ISA_SHAPES, ids=[f"{k}x{n}" for k, n in ISA_SHAPES])
@pytest.mark.parametrize("m", ISA_MS, ids=[f"M{m}" for m in ISA_MS])
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-vera_fp32"],
)
def test_fused_forward_each_cpu_isa(cpu_isa, dtype, adapter_dtype, m, k, n, with_weight, force_path, kernel_calls):
    force_path("fused")
    check_forward(*make_inputs((m,), k, n, 19, dtype, adapter_dtype=adapter_dtype, with_weight=with_weight))
    # h and the rows in one call over a dense W; without one, the adapter term alone (rows with K = 0)
    assert ("lora_fused_cpu" if with_weight else "lora_rows_cpu") in kernel_calls, kernel_calls


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_forward_empty_batch(device, dtype, path, force_path):
    force_path(path)
    x, w, b, a, bb, d, lb, _ = make_inputs((0,), 9, 5, 2, dtype, device=device)
    y, h = forward(x, w, b, a, bb, d, lb, None)
    assert y.shape == (0, 5) and h.shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=dtype_name)
def test_forward_non_native_dtype_runs_reference(dtype, kernel_calls):
    check_forward(*make_inputs((3,), 11, 7, 2, dtype))
    assert not kernel_calls


def test_zero_lambda_b_is_the_base_layer():
    x, w, b, a, bb, d, lb, _ = make_inputs((4,), 20, 10, 3, torch.float32)
    y, _ = forward(x, w, b, a, bb, d, torch.zeros_like(lb), None)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Backward adapter op
# ---------------------------------------------------------------------------------------------
def _backward_adapter_fp64(grad_y, h, vera_b, lambda_d, lambda_b):
    n, r = vera_b.shape
    dy, h2 = fp64(grad_y).reshape(-1, n), fp64(h).reshape(-1, r)
    d, b, bs = fp64(lambda_d), fp64(lambda_b), fp64(vera_b)
    g_prime = (dy * b) @ bs
    return (h2 * g_prime).sum(0), (dy * ((h2 * d) @ bs.t())).sum(0), (g_prime * d).reshape(h.shape)


def _backward_adapter_magnitude(grad_y, h, vera_b, lambda_d, lambda_b):
    # |terms| of each sum: the same formulas on absolute values.
    return _backward_adapter_fp64(*map(absolute, (grad_y, h, vera_b, lambda_d, lambda_b)))


def _check_backward_adapter(*args):
    grad_d, grad_b, g = backward_adapter(*args)
    ref = vera_ops.vera_linear_backward_adapter_reference(*args)
    exact = _backward_adapter_fp64(*args)
    magnitude = _backward_adapter_magnitude(*args)
    _, h, _, lambda_d, lambda_b = args
    assert g.dtype == h.dtype and grad_d.dtype == lambda_d.dtype and grad_b.dtype == lambda_b.dtype
    # Many tokens round b ⊙ B_s to fp32 once before the sums over N (the reference rounds dy ⊙ b instead):
    # one fp32 rounding of an intermediate that the reference's own error does not show.
    for name, got, r_, e, mag in zip(("grad_d", "grad_b", "g"), (grad_d, grad_b, g), ref, exact, magnitude):
        assert_error_within(name, got, r_, e, mag, extra_roundings=1)


BACKWARD_MS = (1, 5, 33, 200)
BACKWARD_SHAPES = ((7, 33), (129, 257), (1000, 17))
BACKWARD_RANKS = (1, 16, 40)


@pytest.mark.parametrize("k,n", BACKWARD_SHAPES, ids=[f"{k}x{n}" for k, n in BACKWARD_SHAPES])
@pytest.mark.parametrize("r", BACKWARD_RANKS, ids=[f"r{r}" for r in BACKWARD_RANKS])
@pytest.mark.parametrize("m", BACKWARD_MS, ids=[f"M{m}" for m in BACKWARD_MS])
@pytest.mark.parametrize("products", ["kernel", "gemm"])  # many tokens on the CPU: csrc/cpu/adapter_products.cpp or torch
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_backward_adapter_matches_fp64(device, dtype, adapter_dtype, m, r, k, n, products, adapter_products):
    adapter_products(products == "kernel")
    lead = (2, m // 2) if m == 200 else (m,)
    x, _, _, a, bb, d, lb, _ = make_inputs(lead, k, n, r, dtype, device=device, adapter_dtype=adapter_dtype)
    h = (fp64(x) @ fp64(a).t()).float()
    grad_y = _randn(*lead, n, dtype=dtype, device=device)
    _check_backward_adapter(grad_y, h, bb, d, lb)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_backward_adapter_empty_batch(device, dtype):
    _, _, _, _, bb, d, lb, _ = make_inputs((1,), 9, 5, 2, dtype, device=device)
    grad_d, grad_b, g = backward_adapter(torch.empty(0, 5, dtype=dtype, device=device),
                                         torch.empty(0, 2, device=device), bb, d, lb)
    assert torch.equal(grad_d, torch.zeros_like(d)) and torch.equal(grad_b, torch.zeros_like(lb))
    assert g.shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# Argument errors name the argument (TypeError for dtypes, ValueError for shapes)
# ---------------------------------------------------------------------------------------------
def test_forward_argument_errors():
    x, w, b, a, bb, d, lb, _ = make_inputs((4,), 7, 9, 3, torch.float32)
    cases = [
        ((torch.randn(4, 8), w, b, a, bb, d, lb, None), ValueError, "weight"),
        ((x.bfloat16(), w, b, a, bb, d, lb, None), TypeError, "weight"),
        ((x.int(), w, b, a, bb, d, lb, None), TypeError, "x"),
        ((x, w, torch.randn(8), a, bb, d, lb, None), ValueError, "bias"),
        ((x, w, b, torch.randn(3, 8), bb, d, lb, None), ValueError, "vera_a"),
        ((x, w, b, a.double(), bb, d, lb, None), TypeError, "vera_a"),
        ((x, w, b, a, torch.randn(9, 4), d, lb, None), ValueError, "vera_b"),
        ((x, w, b, a, torch.randn(10, 3), d, lb, None), ValueError, "vera_b"),
        ((x, w, b, a, bb.bfloat16(), d, lb, None), TypeError, "vera_b"),
        ((x, w, b, a, bb, torch.randn(4), lb, None), ValueError, "lambda_d"),
        ((x, w, b, a, bb, d.double(), lb, None), TypeError, "lambda_d"),
        ((x, w, b, a, bb, d, torch.randn(8), None), ValueError, "lambda_b"),
        ((x, w, b, a, bb, d, lb[None], None), ValueError, "lambda_b"),
        ((x, w, b, a, bb, d, lb, torch.randn(4, 6)), ValueError, "adapter_input"),
        ((x, None, b, a, bb, d, torch.randn(8), None), ValueError, "lambda_b"),
    ]
    for args, exc, name in cases:
        with pytest.raises(exc, match=name):
            forward(*args)


def test_backward_adapter_argument_errors():
    bb, d, lb = torch.randn(9, 3), torch.randn(3), torch.randn(9)
    dy, h = torch.randn(4, 9), torch.randn(4, 3)
    with pytest.raises(ValueError, match="grad_y"):
        backward_adapter(torch.randn(4, 8), h, bb, d, lb)
    with pytest.raises(ValueError, match="h"):
        backward_adapter(dy, torch.randn(5, 3), bb, d, lb)
    with pytest.raises(TypeError, match="h"):
        backward_adapter(dy, h.double(), bb, d, lb)
    with pytest.raises(ValueError, match="lambda_d"):
        backward_adapter(dy, h, bb, torch.randn(2), lb)
    with pytest.raises(ValueError, match="lambda_b"):
        backward_adapter(dy, h, bb, d, torch.randn(8))


def test_kernel_rejects_bad_col_and_v_scale():
    """The binding re-checks: a col_scale / v_scale of the wrong shape or dtype is a ValueError, never a crash."""
    from lowrank._validate import matrix

    x, w, e, v = torch.randn(2, 5), torch.randn(3, 5), torch.randn(3, 4), torch.randn(2, 4)
    out = torch.empty(2, 3)
    args = [matrix("out", out), matrix("x", x), matrix("w", w), None, matrix("v", v), matrix("e", e)]
    with pytest.raises(ValueError, match="col_scale"):
        _C.lora_rows_cpu(*args, matrix("c", torch.randn(4)), None, 1.0, 1)
    with pytest.raises(ValueError, match="col_scale"):
        _C.lora_rows_cpu(*args, matrix("c", torch.randn(3).bfloat16()), None, 1.0, 1)
    with pytest.raises(ValueError, match="col_scale"):
        _C.lora_rows_cpu(*args[:4], None, None, matrix("c", torch.randn(3)), None, 1.0, 1)
    with pytest.raises(ValueError, match="v_scale"):
        _C.lora_rows_cpu(*args, None, matrix("s", torch.randn(5)), 1.0, 1)
    with pytest.raises(ValueError, match="v_scale"):
        _C.lora_rows_cpu(*args, None, matrix("s", torch.randn(4).bfloat16()), 1.0, 1)
    with pytest.raises(ValueError, match="v_scale"):
        _C.lora_rows_cpu(*args[:4], None, None, None, matrix("s", torch.randn(4)), 1.0, 1)
    # the good call: c and s held in locals, since a Matrix is a raw pointer and must not outlive them
    c, s = torch.randn(3), torch.randn(4)
    out.fill_(float("nan"))
    _C.lora_rows_cpu(*args, matrix("c", c), matrix("s", s), 1.0, 1)
    torch.testing.assert_close(out, x @ w.t() + c * ((v * s) @ e.t()))


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels, dispatch, AOT
# ---------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _forward_samples():
    K, N, r = 7, 9, 3
    a, bb = _t(r + 2, K + 4)[:r, :K], _t(N + 3, r + 2)[:N, :r]
    yield "basic", (_t(4, K), _t(N, K), _t(N), a, bb, _t(r), _t(N), None)
    yield "no_bias_dropout", (_t(5, K), _t(N, K), None, a, bb, _t(r), _t(N), _t(5, K))
    yield "no_weight", (_t(5, K), None, _t(N), a, bb, _t(r), _t(N), None)
    bf = torch.bfloat16
    yield "3d_bf16_vera_fp32", (_t(2, 3, K, dtype=bf), _t(N, K, dtype=bf), _t(N, dtype=bf), a, bb, _t(r), _t(N),
                                _t(2, 3, K, dtype=bf))
    yield "gemm_path", (_t(70, K), _t(N, K), _t(N), a, bb, _t(r), _t(N), _t(70, K))
    yield "empty", (_t(0, K), _t(N, K), _t(N), a, bb, _t(r), _t(N), None)
    yield "requires_grad", (_t(4, K, requires_grad=True), _t(N, K), _t(N), a, bb, _t(r, requires_grad=True),
                            _t(N, requires_grad=True), None)


def _backward_adapter_samples():
    N, r = 9, 3
    yield "basic", (_t(4, N), _t(4, r), _t(N, r), _t(r), _t(N))
    yield "3d_bf16", (_t(2, 3, N, dtype=torch.bfloat16), _t(2, 3, r), _t(N + 2, r + 1)[:N, :r], _t(r), _t(N))
    yield "many_tokens", (_t(40, N), _t(40, r), _t(N, r), _t(r), _t(N))
    yield "empty", (_t(0, N), _t(0, r), _t(N, r), _t(r), _t(N))


@pytest.mark.parametrize("args", [pytest.param(a, id=i) for i, a in _forward_samples()])
def test_opcheck_forward(args):
    torch.library.opcheck(forward, args)


@pytest.mark.parametrize("args", [pytest.param(a, id=i) for i, a in _backward_adapter_samples()])
def test_opcheck_backward_adapter(args):
    torch.library.opcheck(backward_adapter, args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and lowrank's CUDA kernels")
@pytest.mark.cuda
def test_opcheck_cuda():
    K, N, r = 7, 9, 3
    c = lambda *s, dt=torch.float16: torch.randn(*s, device="cuda", dtype=dt)  # noqa: E731
    torch.library.opcheck(forward, (c(4, K), c(N, K), c(N), c(r, K), c(N, r), c(r), c(N), c(4, K)))
    torch.library.opcheck(forward, (c(4, K), None, None, c(r + 1, K + 2)[:r, :K], c(N, r), c(r), c(N), None))
    torch.library.opcheck(backward_adapter, (c(4, N), c(4, r, dt=torch.float32), c(N, r), c(r), c(N)))


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 through VeRALinearFunction; low-precision gradients vs float64
# ---------------------------------------------------------------------------------------------
def _y_only(*args):
    y, _ = lowrank.VeRALinearFunction.apply(*args)
    return y


def _f64(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize(
    "case", ["x_d_b_bias", "3d_no_bias", "weight_too", "adapter_input", "no_weight", "no_weight_adapter_input", "only_vera"]
)
def test_gradcheck_vera_linear_function(case):
    K, N, r = 5, 4, 3
    lead = (2, 3) if "3d" in case else (3,)
    x = _f64(*lead, K, requires_grad=case != "only_vera")
    weight = None if case.startswith("no_weight") else _f64(N, K, requires_grad=case == "weight_too")
    bias = None if "no_bias" in case else _f64(N, requires_grad=case != "only_vera")
    vera_a = _f64(r + 2, K + 3, requires_grad=False)[:r, :K]
    vera_b = _f64(N + 1, r + 2, requires_grad=False)[:N, :r]
    adapter_input = _f64(*lead, K) if "adapter_input" in case else None
    args = (x, weight, bias, vera_a, vera_b, _f64(r), _f64(N), adapter_input)
    assert torch.autograd.gradcheck(_y_only, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_projections_get_no_gradient_and_h_is_not_differentiable():
    a, bb = _f64(3, 5), _f64(4, 3)
    y, h = lowrank.VeRALinearFunction.apply(_f64(2, 5), _f64(4, 5, requires_grad=False), None, a, bb, _f64(3), _f64(4), None)
    assert y.requires_grad and not h.requires_grad
    y.sum().backward()
    assert a.grad is None and bb.grad is None


def plain_vera_linear(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input=None):
    """PEFT's formula with plain torch ops (differentiable), in the inputs' dtypes."""
    xa = x if adapter_input is None else adapter_input
    out = lambda_b * F.linear(lambda_d * F.linear(xa.to(vera_a.dtype), vera_a), vera_b)
    if weight is None:
        return (out + bias.to(out.dtype)).to(x.dtype) if bias is not None else out.to(x.dtype)
    return F.linear(x, weight, bias) + out.to(x.dtype)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "adapter_input"])
@pytest.mark.parametrize("m", [3, 70], ids=["M3", "M70"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_vera_linear_function_grads_vs_fp64(device, dtype, adapter_dtype, path, m, dropout, with_weight, force_path):
    """Gradients through the native ops vs float64 autograd on plain torch ops; the tolerance is
    PyTorch's own error when the same plain ops run in the same dtypes."""
    force_path(path)
    K, N, r = 129, 67, 20
    x, w, b, a, bb, d, lb, _ = make_inputs((m,), K, N, r, dtype, device=device, adapter_dtype=adapter_dtype,
                                           with_weight=with_weight)
    xa = F.dropout(x, 0.25, training=True) if dropout else None
    grad_y = _randn(m, N, dtype=dtype, device=device)

    def run(cast, use_kernel):
        x_, b_, d_, lb_ = (cast(t).detach().requires_grad_() for t in (x, b, d, lb))
        w_ = None if w is None else cast(w)
        xa_ = None if xa is None else cast(xa).detach().requires_grad_()
        fn = _y_only if use_kernel else plain_vera_linear
        y = fn(x_, w_, b_, cast(a), cast(bb), d_, lb_, xa_)
        y.backward(cast(grad_y))
        grads = [x_.grad, b_.grad, d_.grad, lb_.grad] + ([xa_.grad] if xa_ is not None else [])
        return [y] + [torch.zeros_like(x_) if g is None else g for g in grads]

    got, same_dtype, exact = run(lambda t: t, True), run(lambda t: t, False), run(fp64, False)
    names = ["y", "grad_x", "grad_bias", "grad_d", "grad_b"] + (["grad_adapter_input"] if dropout else [])
    for name, g, s, e in zip(names, got, same_dtype, exact):
        assert_error_within(name, g, s, e)
