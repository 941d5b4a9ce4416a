"""The adapter-products kernel (csrc/cpu/adapter_products.cpp): ``c = s·x y`` and ``d = s·xᵀ u`` from
one pass over x, against float64 on odd shapes, strided and transposed operands, both output dtypes,
every CPU kernel variant and several thread counts; and the LoRA ops that use it (the backward's
adapter gradients, the bf16 many-token forward's u) with it and without it. Also its companion
``adapter_term`` (``out = bias + s·u eᵀ``, the bf16 many-token GEMM paths' adapter term)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank import _C
from lowrank._validate import matrix, optional_matrix
from lowrank.ops import _runtime
from lowrank.ops import lora as lora_ops

from conftest import assert_error_within, dtype_name

pytestmark = pytest.mark.skipif(not hasattr(_C, "adapter_products_cpu"), reason="no adapter-products kernel")


def _operand(rows, cols, dtype, how):
    """A [rows, cols] operand: contiguous, a column slice (row stride > cols) or a transposed copy's
    transpose (the same values, rows at stride cols)."""
    if how == "slice":
        return torch.randn(rows, cols + 5)[:, 2 : cols + 2].to(dtype)
    return torch.randn(rows, cols).to(dtype)


def _call(x, *, y=None, y_t=False, u=None, d_t=False, scale=1.0, c_dtype=torch.float32, d_dtype=torch.float32,
          threads=None):  # fmt: skip
    m, k = x.shape
    c = d = None
    if y is not None:
        c = torch.full((m, y.shape[0] if y_t else y.shape[1]), float("nan"), dtype=c_dtype)
    if u is not None:
        r = u.shape[1]
        d = torch.full((r, k) if d_t else (k, r), float("nan"), dtype=d_dtype)
    _C.adapter_products_cpu(optional_matrix("c", c), optional_matrix("d", d), matrix("x", x), optional_matrix("y", y),
                            optional_matrix("u", u), y_t, d_t, scale, threads or _runtime.num_threads())  # fmt: skip
    return c, d


def _exact(x, y, y_t, u, d_t, scale):
    x64 = x.double()
    c = None if y is None else scale * x64 @ (y.t() if y_t else y).double()
    d = None if u is None else scale * x64.t() @ u.double()
    if d is not None and d_t:
        d = d.t()
    return c, d


SHAPES = ((1, 1, 1), (3, 17, 5), (8, 64, 16), (13, 300, 33), (67, 129, 16), (9, 5, 40), (10, 301, 20))


@pytest.mark.parametrize("m,k,r", SHAPES, ids=[f"M{m}-K{k}-R{r}" for m, k, r in SHAPES])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("layout", ["contiguous", "slice"])
def test_products_each_cpu_isa(cpu_isa, m, k, r, x_dtype, layout):
    x = _operand(m, k, x_dtype, layout)
    scale = 0.37
    for y_t, d_t, y_dtype, out_dtype in itertools.product((False, True), (False, True), (torch.float32, torch.bfloat16),
                                                          (torch.float32, torch.bfloat16)):  # fmt: skip
        y = _operand(r, k, y_dtype, layout) if y_t else _operand(k, r, y_dtype, layout)
        u = _operand(m, r, y_dtype, layout)
        ec, ed = _exact(x, y, y_t, u, d_t, scale)
        for want_c, want_d in ((True, True), (True, False), (False, True)):
            c, d = _call(x, y=y if want_c else None, y_t=y_t, u=u if want_d else None, d_t=d_t, scale=scale,
                         c_dtype=out_dtype, d_dtype=out_dtype)  # fmt: skip
            if want_c:
                mag_c = x.double().abs() @ (y.t() if y_t else y).double().abs() * scale
                tol = ec.abs() * (2.0**-8 if out_dtype == torch.bfloat16 else 2.0**-24) + 2.0**-24 * (k + 2) * mag_c
                assert c.dtype == out_dtype and not torch.isnan(c).any()
                assert ((c.double() - ec).abs() <= tol + 1e-30).all(), (y_t, y_dtype, out_dtype, "c")
            else:
                assert c is None
            if want_d:
                mag_d = x.double().abs().t() @ u.double().abs() * scale
                mag_d = mag_d.t() if d_t else mag_d
                tol = ed.abs() * (2.0**-8 if out_dtype == torch.bfloat16 else 2.0**-24) + 2.0**-24 * (m + 2) * mag_d
                assert d.dtype == out_dtype and not torch.isnan(d).any()
                assert ((d.double() - ed).abs() <= tol + 1e-30).all(), (d_t, y_dtype, out_dtype, "d")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_products_thread_counts(x_dtype):
    """Rows split over tasks (each a partial d, summed in task order): the same bits run to run for a
    thread count, and within fp32 accumulation of each other across counts, including more tasks
    than row blocks."""
    for m, k, r in ((1, 40, 3), (9, 1030, 16), (70, 33, 17), (512, 96, 16), (300, 513, 16)):
        # y in x's dtype: a bf16 pair takes AVX512-BF16's products where the CPU has them
        x, y, u = _operand(m, k, x_dtype, "slice"), torch.randn(k, r).to(x_dtype), torch.randn(m, r)
        ec, ed = _exact(x, y, False, u, False, 1.0)
        x64 = x.double().abs()
        mag_c, mag_d = x64 @ y.double().abs(), x64.t() @ u.double().abs()  # the sums of |terms|
        for threads in (1, 2, 3, 8):
            c, d = _call(x, y=y, u=u, threads=threads)
            c2, d2 = _call(x, y=y, u=u, threads=threads)
            assert torch.equal(c, c2) and torch.equal(d, d2)
            for got, exact, mag, n in ((c, ec, mag_c, k), (d, ed, mag_d, m)):
                assert ((got.double() - exact).abs() <= 2.0**-24 * (n + 2) * mag).all(), (m, k, r, threads)


def test_products_argument_errors():
    x, y, u = torch.randn(4, 6), torch.randn(6, 3), torch.randn(4, 3)
    c, d = torch.empty(4, 3), torch.empty(6, 3)
    M = matrix
    call = _C.adapter_products_cpu
    with pytest.raises(ValueError, match="y and c: give both or neither"):
        call(M("c", c), None, M("x", x), None, None, False, False, 1.0, 1)
    with pytest.raises(ValueError, match="nothing to compute"):
        call(None, None, M("x", x), None, None, False, False, 1.0, 1)
    with pytest.raises(ValueError, match=r"y: expected shape \[6, 3\]"):
        call(M("c", c), None, M("x", x), M("y", torch.randn(5, 3)), None, False, False, 1.0, 1)
    with pytest.raises(ValueError, match=r"c: expected shape \[4, 3\]"):
        call(M("c", torch.empty(3, 3)), None, M("x", x), M("y", y), None, False, False, 1.0, 1)
    with pytest.raises(ValueError, match=r"d: expected shape \[3, 6\]"):
        call(None, M("d", d), M("x", x), None, M("u", u), False, True, 1.0, 1)
    with pytest.raises(ValueError, match=r"u: expected shape \[4, 3\]"):
        call(None, M("d", d), M("x", x), None, M("u", torch.randn(5, 3)), False, False, 1.0, 1)
    with pytest.raises(ValueError, match="x: expected float32 or bfloat16"):
        call(M("c", c), None, M("x", x.to(torch.int32)), M("y", y), None, False, False, 1.0, 1)
    with pytest.raises(ValueError, match="nothing to compute"):  # rank 0: empty views have no data pointer
        call(M("c", c[:, :0]), None, M("x", x), M("y", y[:, :0]), None, False, False, 1.0, 1)


# ---------------------------------------------------------------------------------------------
# adapter_term: out = bias + scale·u eᵀ (the bf16 many-token GEMM paths' adapter term)
# ---------------------------------------------------------------------------------------------
TERM_SHAPES = [(1, 5, 1), (3, 33, 7), (9, 64, 16), (17, 100, 16), (70, 31, 256), (129, 257, 5), (45, 70, 100)]


@pytest.mark.parametrize("m,n,r", TERM_SHAPES, ids=[f"M{m}-N{n}-R{r}" for m, n, r in TERM_SHAPES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_adapter_term_each_cpu_isa(cpu_isa, m, n, r, out_dtype, e_dtype):
    """Against float64: rows past the 8-row tile and not a multiple of it, columns past the 32-wide step
    (the element-wise tail), e as [N, R] (a column slice) and as [R, N] read transposed (rows longer
    than N, NaN past it), with and without a bias (out's dtype or fp32) and a column scale, into a
    poisoned out; fp32 sums and one rounding."""
    torch.manual_seed(m * 1000 + n)
    u = torch.randn(m, r + 3)[:, 1 : r + 1]  # rows at stride r + 3
    e = _operand(n, r, e_dtype, "slice")
    variants = ((False, None, 1, False), (True, out_dtype, 2, True), (False, torch.float32, 3, True), (True, None, 1, False))
    for transposed, bias_dtype, threads, scaled in variants:
        bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
        col_scale = torch.randn(n) if scaled else None
        out = torch.full((m, n), float("nan"), dtype=out_dtype)
        # eᵀ with rows longer than N (read in place when fp32: the last panel must not run past a row)
        e_in = torch.full((r, n + 5), float("nan"), dtype=e_dtype)[:, :n].copy_(e.t()) if transposed else e
        _C.adapter_term_cpu(matrix("out", out), matrix("u", u), matrix("e", e_in), optional_matrix("bias", bias),
                            1.7, transposed, threads, optional_matrix("col_scale", col_scale))  # fmt: skip
        cs = 1.0 if col_scale is None else col_scale.double()
        exact = 1.7 * cs * (u.double() @ e.double().t())
        mag = 1.7 * abs(cs) * (u.double().abs() @ e.double().abs().t())
        if bias is not None:
            exact, mag = exact + bias.double(), mag + bias.double().abs()
        rounding = 2.0**-8 * exact.abs() if out_dtype == torch.bfloat16 else 0
        assert torch.isfinite(out).all(), transposed
        assert ((out.double() - exact).abs() <= rounding + 2.0**-24 * (r + 4) * mag).all(), transposed


@pytest.mark.parametrize("m,n,r", [(17, 100, 16), (9, 64, 3)], ids=["M17-N100-R16", "M9-N64-R3"])
def test_adapter_term_bf16_is_its_fp32_sums_rounded_once(cpu_isa, m, n, r):
    """A bf16 out holds exactly the fp32 out's values rounded to nearest even (torch's rounding) — the
    same sums, one rounding — also where the AVX-512 variant stores with AVX512-BF16's conversion, which
    flushes subnormal inputs to zero: rows scaled into the fp32 subnormal range (and down to zero), rows
    of huge values (where bf16 rounds to infinity) and a NaN row."""
    u = torch.randn(m, r)
    u[1] *= 2.0**-130  # fp32 subnormal sums
    u[2] *= 2.0**-149
    u[3] *= 2.0**126  # sums near and past the largest finite value
    u[4, 0] = float("nan")
    e = torch.randn(n, r).bfloat16()
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((m, n), float("nan"), dtype=dtype)
        _C.adapter_term_cpu(matrix("out", out), matrix("u", u), matrix("e", e), None, 1.0, False, 2)
        outs[dtype] = out
    want, got = outs[torch.float32].bfloat16(), outs[torch.bfloat16]
    assert (outs[torch.float32][1] != 0).any() and (outs[torch.float32][1].abs() < 2.0**-126).any()
    assert (outs[torch.float32][3].abs() > 2.0**126).any() and torch.isnan(got[4]).all()
    same = (got.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(got) & torch.isnan(want))
    assert same.all(), same.logical_not().nonzero()[:5]
    if cpu_isa != "avx512bf16":
        return
    # every bit as the avx512 variant (the same sums, stored the exact way) writes it, NaN payloads included
    u[5, 0] = torch.tensor(0x7F812345, dtype=torch.int32).view(torch.float32)  # a signalling NaN's payload
    bits = {}
    for isa in (cpu_isa, "avx512"):
        _C.set_cpu_isa(isa)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        _C.adapter_term_cpu(matrix("out", out), matrix("u", u), matrix("e", e), None, 1.0, False, 2)
        bits[isa] = out.view(torch.int16)
    assert torch.equal(bits[cpu_isa], bits["avx512"])


def test_adapter_term_argument_errors():
    out, u, e = torch.empty(4, 6), torch.randn(4, 3), torch.randn(6, 3)
    M = matrix
    call = _C.adapter_term_cpu
    call(M("out", out), M("u", u), M("e", e), None, 1.0, False, 1)  # well-formed: runs
    with pytest.raises(ValueError, match=r"u: expected shape \[4, 3\]"):
        call(M("out", out), M("u", torch.randn(5, 3)), M("e", e), None, 1.0, False, 1)
    with pytest.raises(ValueError, match=r"e: expected shape \[3, 6\]"):
        call(M("out", out), M("u", u), M("e", e), None, 1.0, True, 1)
    with pytest.raises(ValueError, match=r"e: expected shape \[6, 3\]"):
        call(M("out", out), M("u", u), M("e", torch.randn(6, 4)), None, 1.0, False, 1)
    with pytest.raises(ValueError, match=r"bias: expected shape \[1, 6\]"):
        call(M("out", out), M("u", u), M("e", e), M("bias", torch.randn(5)), 1.0, False, 1)
    with pytest.raises(ValueError, match="u: expected float32, got bfloat16"):
        call(M("out", out), M("u", u.bfloat16()), M("e", e), None, 1.0, False, 1)
    with pytest.raises(ValueError, match="out: expected float32 or bfloat16"):
        call(M("out", out.to(torch.int32)), M("u", u), M("e", e), None, 1.0, False, 1)
    with pytest.raises(ValueError, match=r"col_scale: expected shape \[1, 6\]"):
        call(M("out", out), M("u", u), M("e", e), None, 1.0, False, 1, M("col_scale", torch.randn(5)))
    with pytest.raises(ValueError, match="col_scale: expected float32, got bfloat16"):
        call(M("out", out), M("u", u), M("e", e), None, 1.0, False, 1, M("col_scale", torch.randn(6).bfloat16()))


# ---------------------------------------------------------------------------------------------
# The ops that use it: the same results with the kernel and with torch's GEMMs
# ---------------------------------------------------------------------------------------------
def _fp64(t):
    return t.double()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "gemm"])
@pytest.mark.parametrize("m,k,n,r", [(1, 7, 5, 1), (70, 129, 257, 16), (200, 33, 1000, 5), (513, 96, 40, 33)])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32a"])  # fmt: skip
def test_backward_adapter_with_and_without_kernel(kernel, m, k, n, r, dtype, adapter_dtype, adapter_products,
                                                  kernel_calls):  # fmt: skip
    adapter_products(kernel)
    xa = torch.randn(m, k).to(dtype)
    lora_a, lora_b = (torch.randn(r, k) * k**-0.5).to(adapter_dtype), (torch.randn(n, r) * 0.1).to(adapter_dtype)
    u = (_fp64(xa) @ _fp64(lora_a).t()).float()
    grad_y = torch.randn(m, n).to(dtype)
    args = (grad_y, xa, u, lora_a, lora_b, 1.7)
    got = lora_ops._backward_adapter_native(*args)
    ref = lora_ops.lora_linear_backward_adapter_reference(*args)
    dy, x64, u64, b64 = _fp64(grad_y), _fp64(xa), _fp64(u), _fp64(lora_b)
    g = 1.7 * dy @ b64
    exact = (g.t() @ x64, 1.7 * dy.t() @ u64, g)
    magnitude = ((1.7 * dy.abs() @ b64.abs()).t() @ x64.abs(), 1.7 * dy.abs().t() @ u64.abs(), 1.7 * dy.abs() @ b64.abs())
    assert [t.dtype for t in got] == [adapter_dtype, adapter_dtype, torch.float32]
    for name, t, rr, e, mag in zip(("grad_a", "grad_b", "g"), got, ref, exact, magnitude):
        assert_error_within(name, t, rr, e, mag)
    assert ("adapter_products_cpu" in kernel_calls) == kernel, kernel_calls


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "gemm"])
@pytest.mark.parametrize("m,k,r", [(70, 129, 16), (300, 33, 5)])
def test_bf16_many_token_down_projection(kernel, m, k, r, adapter_products, kernel_calls):
    """u = x_a Aᵀ of the bf16 many-token forward: fp32 from the unrounded products either way."""
    adapter_products(kernel)
    xa = torch.randn(m, k).bfloat16()
    for a in (torch.randn(r, k).bfloat16(), torch.randn(r, k + 3)[:, :k]):
        u = lora_ops.down_projection_many(xa, a)
        exact = _fp64(xa) @ _fp64(a).t()
        assert u.dtype == torch.float32
        tol = 2.0**-24 * (k + 2) * (_fp64(xa).abs() @ _fp64(a).abs().t())
        assert ((u.double() - exact).abs() <= tol).all()
    assert ("adapter_products_cpu" in kernel_calls) == kernel, kernel_calls


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_lora_layer_training_step_with_and_without_kernel(kernel, dtype, adapter_products, force_path):
    """A LoRALinear training step on many tokens: the same gradients (within rounding) either way."""
    import lowrank

    force_path("gemm")
    torch.manual_seed(0)
    layer = lowrank.LoRALinear(96, 80, r=8, alpha=16, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 70, 96).to(dtype)
    grads = {}
    for flag in (kernel, not kernel):
        adapter_products(flag)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        layer(xi).float().square().mean().backward()
        grads[flag] = (xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    # Each path accumulates in fp32 and rounds once: they differ by fp32 summation order, and in bf16 by
    # one rounding step (2 units of roundoff) where that order tips a value across a rounding boundary.
    rtol = 1e-6 if dtype == torch.float32 else 2.0**-7
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-5 * a.float().abs().max().item())
