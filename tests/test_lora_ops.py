"""The LoRA ops (torch.ops.lowrank.lora_linear_*) against float64, on random data over odd shapes.

Every comparison is precision-derived (conftest.assert_error_within): the kernel's largest error
against the float64 result may be at most a small multiple of the error that the pure-PyTorch
reference (lowrank.ops.lora_linear_*_reference) makes in the same dtype.

    y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ,   u = x_a Aᵀ (fp32)         x: [..., K], W: [N, K], A: [r, K], B: [N, r]
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import _C
from lowrank.ops import _gemm, _runtime
from lowrank.ops import lora as lora_ops

from conftest import (
    HAS_CUDA,
    absolute,
    assert_error_within,
    device_dtype_params,
    dtype_name,
    fp64,
    lora_forward_fp64,
    plain_lora_linear,
    same_dtype_reference,
    took_native_16bit_gemm,
)

forward = torch.ops.lowrank.lora_linear_forward
backward_adapter = torch.ops.lowrank.lora_linear_backward_adapter
backward_input = torch.ops.lowrank.lora_linear_backward_input

SCALE = 1.75  # alpha / r for some alpha; not a power of two, so scaling is not exact

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _randn(*shape, dtype, device, std=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(device=device, dtype=dtype)


def _strided(rows, cols, *, dtype, device, std, how):
    """A [rows, cols] tensor laid out as ``how``: contiguous, an offset slice with row stride > cols,
    or a transposed view."""
    if how == "slice":
        big = _randn(rows + 5, cols + 11, dtype=dtype, device=device, std=std)
        return big[3 : rows + 3, 2 : cols + 2]
    if how == "transposed":
        return _randn(cols, rows, dtype=dtype, device=device, std=std).t()
    return _randn(rows, cols, dtype=dtype, device=device, std=std)


def make_inputs(
    lead,
    k,
    n,
    r,
    dtype,
    *,
    device="cpu",
    adapter_dtype=None,
    bias=True,
    dropout=False,
    x_layout="contiguous",
    weight_layout="contiguous",
    lora_layout="contiguous",
):
    """Fresh random (x, weight, bias, lora_a, lora_b, adapter_input); lora_b is never zero."""
    adapter_dtype = adapter_dtype or dtype
    lead = tuple(lead)
    if x_layout == "contiguous":
        x = _randn(*lead, k, dtype=dtype, device=device)
    elif x_layout == "transposed":  # [M, K] with strides (1, M)
        assert len(lead) == 1
        x = _randn(k, *lead, dtype=dtype, device=device).t()
    elif x_layout == "row_slice":  # [M, K] at an offset, row stride K + 13
        assert len(lead) == 1
        x = _randn(*lead, k + 13, dtype=dtype, device=device)[:, 5 : k + 5]
    elif x_layout == "permuted":  # [a, b, K] with the last dim strided
        x = _randn(lead[0], k, *lead[1:], dtype=dtype, device=device).movedim(1, -1)
    else:
        raise ValueError(x_layout)
    weight = _strided(n, k, dtype=dtype, device=device, std=max(k, 1) ** -0.5, how=weight_layout)
    b = _randn(n, dtype=dtype, device=device, std=0.5) if bias else None
    lora_a = _strided(r, k, dtype=adapter_dtype, device=device, std=max(k, 1) ** -0.5, how=lora_layout)
    lora_b = _strided(n, r, dtype=adapter_dtype, device=device, std=max(r, 1) ** -0.5, how=lora_layout)
    adapter_input = None
    if dropout:
        adapter_input = F.dropout(x, p=0.25, training=True)
    return x, weight, b, lora_a, lora_b, adapter_input


def check_forward(x, weight, b, lora_a, lora_b, adapter_input, scale=SCALE):
    y, u = forward(x, weight, b, lora_a, lora_b, scale, adapter_input)
    y_ref, u_ref = lora_ops.lora_linear_forward_reference(x, weight, b, lora_a, lora_b, scale, adapter_input)
    y64, u64 = lora_forward_fp64(x, weight, b, lora_a, lora_b, scale, adapter_input)
    y_mag, u_mag = lora_forward_fp64(*map(absolute, (x, weight, b, lora_a, lora_b, scale, adapter_input)))
    assert y.device == x.device and u.device == x.device
    assert u.dtype == torch.float32
    plain = plain_lora_linear(x, weight, b, lora_a, lora_b, scale, adapter_input)
    native16 = took_native_16bit_gemm(x, weight)
    y_ref = same_dtype_reference(y_ref, plain, y64, native16)
    # torch's 16-bit GEMM path rounds bias + adapter term once before the GEMM adds it: one rounding more
    assert_error_within("y", y, y_ref, y64, y_mag, extra_roundings=int(native16))
    assert_error_within("u", u, u_ref, u64, u_mag)
    return y, u


# ---------------------------------------------------------------------------------------------
# Forward: shapes x dtypes x ranks x both paths
# ---------------------------------------------------------------------------------------------
MS = (1, 2, 3, 5, 16, 17, 64, 65, 200)
# (in, out, bias); no size is a multiple of any tile (vector width 8/16, NR=4, 64-row tasks, KC=1024).
SHAPES = ((1, 7, True), (7, 33, False), (33, 129, True), (129, 257, False), (257, 1000, True), (1000, 1, False))
RANKS = (1, 3, 16)
M_PATHS = [(m, p) for m in MS for p in ("fused", "gemm")]
ROW_KERNELS = {"lora_rows_cpu", "lora_fused_cpu", "lora_rows_cuda"}  # lora_fused_cpu: u and the rows in one call


@pytest.mark.parametrize("k,n,bias", SHAPES, ids=[f"{k}x{n}-{'bias' if b else 'nobias'}" for k, n, b in SHAPES])
@pytest.mark.parametrize("r", RANKS, ids=[f"r{r}" for r in RANKS])
@pytest.mark.parametrize("m,path", M_PATHS, ids=[f"M{m}-{p}" for m, p in M_PATHS])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_forward_matches_fp64(device, dtype, m, path, r, k, n, bias, force_path, kernel_calls, request):
    force_path(path)
    check_forward(*make_inputs((m,), k, n, r, dtype, device=device, bias=bias))
    took_fused = bool(ROW_KERNELS.intersection(kernel_calls))
    assert took_fused == (path == "fused"), f"expected the {path} path, kernel calls: {kernel_calls}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_forward_rank_zero(dtype, path, force_path, cpu_isa):
    """The op takes r = 0 (an adapter with no rank: y = x Wᵀ + b, u empty) on every path; the fused
    call used to refuse it (no data pointer behind an empty B)."""
    force_path(path)
    check_forward(*make_inputs((5,), 33, 17, 0, dtype, bias=True))


# ---------------------------------------------------------------------------------------------
# Forward: dropout input, fp32 adapters on a low-precision base, views, 3-D and 1-D inputs
# ---------------------------------------------------------------------------------------------
LAYOUTS = {
    # name: (lead shape as a function of M, make_inputs keyword arguments)
    "contiguous": (lambda m: (m,), {}),
    "x_transposed": (lambda m: (m,), {"x_layout": "transposed"}),
    "x_row_slice": (lambda m: (m,), {"x_layout": "row_slice"}),
    "weight_slice": (lambda m: (m,), {"weight_layout": "slice"}),
    "lora_slice": (lambda m: (m,), {"lora_layout": "slice"}),
    "lora_transposed": (lambda m: (m,), {"lora_layout": "transposed"}),
    "3d": (lambda m: (2, max(1, m // 2)), {}),
    "3d_permuted": (lambda m: (2, max(1, m // 2)), {"x_layout": "permuted"}),
}
VARIANT_M_PATHS = [(1, "fused"), (5, "fused"), (200, "fused"), (5, "gemm"), (200, "gemm")]


def _adapter_dtype_params():
    out = []
    for p in device_dtype_params():
        device, dtype = p.values
        out.append(pytest.param(device, dtype, dtype, marks=p.marks, id=f"{p.id}-lora_same"))
        if dtype != torch.float32:
            out.append(pytest.param(device, dtype, torch.float32, marks=p.marks, id=f"{p.id}-lora_fp32"))
    return out


@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "adapter_input"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m,path", VARIANT_M_PATHS, ids=[f"M{m}-{p}" for m, p in VARIANT_M_PATHS])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_forward_variants_match_fp64(device, dtype, adapter_dtype, m, path, layout, dropout, force_path, request):
    force_path(path)
    lead_of, kw = LAYOUTS[layout]
    kw = dict(kw, device=device, adapter_dtype=adapter_dtype, dropout=dropout)
    inputs = make_inputs(lead_of(m), 131, 67, 5, dtype, **kw)
    y, u = check_forward(*inputs)
    lead = inputs[0].shape[:-1]
    assert y.shape == lead + (67,) and u.shape == lead + (5,)


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_forward_1d_input(device, dtype, path, force_path, request):
    force_path(path)
    x, weight, b, lora_a, lora_b, _ = make_inputs((1,), 45, 23, 3, dtype, device=device)
    y, u = check_forward(x[0], weight, b, lora_a, lora_b, None)
    assert y.shape == (23,) and u.shape == (3,)


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_forward_uses_adapter_input_only_for_the_adapter(path, force_path):
    """x feeds the base product and adapter_input (here unrelated to x) feeds u."""
    force_path(path)
    x, weight, b, lora_a, lora_b, _ = make_inputs((4,), 33, 17, 3, torch.float32)
    check_forward(x, weight, b, lora_a, lora_b, torch.randn_like(x))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 140),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    r=st.integers(1, 20),
    dtypes=st.sampled_from([(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]),
    path=st.sampled_from(["fused", "gemm"]),
    layout=st.sampled_from(["contiguous", "x_transposed", "x_row_slice", "weight_slice", "lora_transposed"]),
    bias=st.booleans(),
    dropout=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_random_shapes(m, k, n, r, dtypes, path, layout, bias, dropout, seed, force_path):
    """Property test over arbitrary sizes: the same precision contract as the fixed grid above."""
    torch.manual_seed(seed)
    force_path(path)
    lead_of, kw = LAYOUTS[layout]
    kw = dict(kw, adapter_dtype=dtypes[1], bias=bias, dropout=dropout)
    check_forward(*make_inputs(lead_of(m), k, n, r, dtypes[0], **kw))


# ---------------------------------------------------------------------------------------------
# The fused path under every CPU kernel variant (portable / AVX2 / AVX-512 where supported)
# ---------------------------------------------------------------------------------------------
ISA_MS = (1, 2, 3, 4, 5, 17, 64, 130)  # every micro-tile remainder (3 and 4 rows); >64 rows: several passes
# K = 2053 runs the K-blocked loop with a ragged last block (KC = 1024; 2048 for bf16 products, whose
# last block is then 5 long); N = 257 spans five 64-row tasks.
ISA_SHAPES = ((7, 5), (129, 257), (2053, 67))
# r: tail only, one vector, two-vector loop + vector + tail; with and without bias
ISA_RANKS_BIAS = ((1, True), (8, False), (23, True))
ISA_DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-lora_fp32"),
]


@pytest.mark.parametrize("r,bias", ISA_RANKS_BIAS, ids=[f"r{r}-{'bias' if b else 'nobias'}" for r, b in ISA_RANKS_BIAS])
@pytest.mark.parametrize("k,n", ISA_SHAPES, ids=[f"{k}x{n}" for k, n in ISA_SHAPES])
@pytest.mark.parametrize("m", ISA_MS, ids=[f"M{m}" for m in ISA_MS])
@pytest.mark.parametrize("dtype,adapter_dtype", ISA_DTYPES)
def test_fused_forward_each_cpu_isa(cpu_isa, dtype, adapter_dtype, m, k, n, r, bias, force_path, kernel_calls):
    force_path("fused")
    check_forward(*make_inputs((m,), k, n, r, dtype, adapter_dtype=adapter_dtype, bias=bias))
    assert ROW_KERNELS.intersection(kernel_calls), kernel_calls


BF16_ROW_CASES = [(1, 7, 5), (3, 31, 9), (5, 33, 70), (16, 100, 41), (17, 1030, 13), (9, 4171, 11), (65, 64, 7)]


@pytest.mark.parametrize("dot", [True, False], ids=["dot", "widen"])
@pytest.mark.parametrize("m,k,n", BF16_ROW_CASES, ids=[f"M{m}-{k}x{n}" for m, k, n in BF16_ROW_CASES])
def test_fused_bf16_rows_either_choice(cpu_isa, dot, m, k, n, force_path, monkeypatch, kernel_calls):
    """``cpu_lora_bf16_rows``: a bf16 x read as bf16 (AVX512-BF16 products against the bf16 W where the
    CPU and kernel variant have them, x widened in the kernel elsewhere) or widened in Python: within the
    contract of float64 either way — K not a multiple of the 32-wide chunk (masked tails), K past the
    1024 and 2048 blocks (three of them, the last ragged), M past the 64-row pass, bias, a bf16 or fp32 adapter."""
    force_path("fused")
    monkeypatch.setattr(_runtime, "CPU_LORA_BF16_DOT", dot)
    for adapter_dtype, bias in ((torch.bfloat16, True), (torch.float32, False)):
        check_forward(*make_inputs((m,), k, n, 4, torch.bfloat16, adapter_dtype=adapter_dtype, bias=bias))
    assert ROW_KERNELS.intersection(kernel_calls), kernel_calls


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_row_kernel_bf16_x_matches_widened_x(cpu_isa, out_dtype, e_dtype):
    """``lora_rows_cpu`` with a bf16 x (bf16 products, or widened in C++ where the products are missing)
    against the same x widened to fp32 by the caller, VeRA's per-column and per-rank scales included:
    the same exact products summed in another order, each within fp32 summation error of float64 (and
    half a bf16 ulp more for a bf16 out). Poisoned outputs: every element must be written."""
    from lowrank._validate import matrix

    torch.manual_seed(11)
    for m, k, n in ((1, 45, 19), (6, 77, 30), (70, 1100, 9)):
        x = torch.randn(m, k).bfloat16()
        w = (torch.randn(n, k) * k**-0.5).bfloat16()
        bias = torch.randn(n).bfloat16()
        v, e = torch.randn(m, 5), (torch.randn(n, 5) * 0.3).to(e_dtype)
        col, vs = torch.rand(n) + 0.5, torch.rand(5) + 0.5
        outs = []
        for x_in in (x, x.float()):
            y = torch.full((m, n), float("nan"), dtype=out_dtype)
            _C.lora_rows_cpu(matrix("out", y), matrix("x", x_in), matrix("w", w), matrix("bias", bias[None]),
                             matrix("v", v), matrix("e", e), matrix("c", col[None]), matrix("s", vs[None]), 1.5, 2)  # fmt: skip
            outs.append(y)
        exact = (x.double() @ w.double().t() + bias.double()
                 + 1.5 * col.double() * ((v.double() * vs.double()) @ e.double().t()))  # fmt: skip
        mag = (x.double().abs() @ w.double().abs().t() + bias.double().abs()
               + 1.5 * col.double() * ((v.double() * vs.double()).abs() @ e.double().abs().t()))  # fmt: skip
        rounding = 2**-8 * exact.abs() if out_dtype == torch.bfloat16 else 0
        for y in outs:
            assert torch.isfinite(y).all()
            assert ((y.double() - exact).abs() <= rounding + (k + 8) * 2**-24 * mag).all(), (m, k, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fused_forward_each_cpu_isa_views_and_dropout(cpu_isa, dtype, force_path):
    force_path("fused")
    for kw in ({"x_layout": "row_slice"}, {"weight_layout": "slice"}, {"lora_layout": "slice"}, {"dropout": True}):
        check_forward(*make_inputs((6,), 67, 41, 4, dtype, **kw))


def test_cpu_isa_switch_and_errors():
    supported = _C.supported_cpu_isas()
    assert "portable" in supported
    assert _C.cpu_isa() in supported
    original = _C.cpu_isa()
    with pytest.raises(ValueError, match="isa"):
        _C.set_cpu_isa("sse1")
    for name in ("avx2", "avx512", "avx512bf16"):
        if name not in supported:
            with pytest.raises(ValueError, match=name):
                _C.set_cpu_isa(name)
    assert _C.cpu_isa() == original


# ---------------------------------------------------------------------------------------------
# Dispatch, threads, concurrency
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_default_dispatch_crossover(dtype, kernel_calls):
    limit = _runtime.cpu_fused_max_m(dtype)  # measured on this machine (0: the GEMM path won even at M=1)
    assert limit >= 0
    sizes = (1, limit, limit + 1) if limit < 1000 else (1, 17, 200)  # unbounded: always fused
    sizes = tuple(m for m in sizes if m >= 1)
    for m in sizes:
        kernel_calls.clear()
        check_forward(*make_inputs((m,), 40, 24, 4, dtype))
        assert bool(ROW_KERNELS.intersection(kernel_calls)) == (m <= limit), f"M={m}: kernel calls {kernel_calls}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fused_forward_independent_of_thread_count(dtype, force_path):
    """Each output row is computed by one thread in a fixed order: bitwise the same for any count."""
    force_path("fused")
    inputs = make_inputs((7,), 301, 517, 6, dtype)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append(forward(*inputs[:5], SCALE, inputs[5]))
    finally:
        torch.set_num_threads(old)
    for y, u in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(u, results[0][1])


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_forward_concurrent_python_threads(path, force_path):
    """Calls from several Python threads at once (the GIL is released in the kernels) stay correct."""
    force_path(path)
    cases = [make_inputs((m,), 257, 129, 4, dt) for m, dt in [(3, torch.float32), (9, torch.bfloat16)] * 3]
    expected = [forward(*c[:5], SCALE, c[5]) for c in cases]
    results = [None] * len(cases)
    errors = []

    def work(i):
        try:
            for _ in range(20):
                results[i] = forward(*cases[i][:5], SCALE, cases[i][5])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (y, u), (y_exp, u_exp) in zip(results, expected):
        assert torch.equal(y, y_exp) and torch.equal(u, u_exp)


# ---------------------------------------------------------------------------------------------
# Empty and degenerate sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["M0", "2x0", "0x3"])
@pytest.mark.parametrize(
    "path", ["fused", "gemm"]
)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_forward_empty_batch(device, dtype, path, lead, force_path):
    force_path(path)
    inputs = make_inputs(lead, 33, 17, 3, dtype, device=device)
    y, u = check_forward(*inputs)
    assert y.shape == tuple(lead) + (17,) and u.shape == tuple(lead) + (3,)


def test_forward_empty_batch_default_dispatch():
    """M=0 as a user meets it: an empty batch through LoRALinear (default dispatch, CPU)."""
    layer = lowrank.LoRALinear(8, 5, r=2)
    assert layer(torch.randn(0, 8)).shape == (0, 5)


@pytest.mark.parametrize("m", [3, 70], ids=["fused", "gemm"])
def test_forward_zero_in_features(m):
    check_forward(*make_inputs((m,), 0, 5, 2, torch.float32))


def test_forward_zero_out_features_fused(force_path):
    force_path("fused")
    check_forward(*make_inputs((3,), 7, 0, 2, torch.float32))


def test_forward_zero_out_features_gemm(force_path):
    force_path("gemm")
    y, u = check_forward(*make_inputs((3,), 7, 0, 2, torch.float32))
    assert y.shape == (3, 0)


def test_forward_strided_bias_fused(force_path):
    force_path("fused")
    x, weight, _, lora_a, lora_b, _ = make_inputs((3,), 16, 9, 2, torch.float32)
    check_forward(x, weight, torch.randn(18)[::2], lora_a, lora_b, None)


def test_forward_strided_bias_gemm(force_path):
    force_path("gemm")
    x, weight, _, lora_a, lora_b, _ = make_inputs((3,), 16, 9, 2, torch.float32)
    check_forward(x, weight, torch.randn(18)[::2], lora_a, lora_b, None)


# ---------------------------------------------------------------------------------------------
# Dtypes without native kernels run the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=dtype_name)
def test_forward_non_native_dtype_runs_reference(dtype, kernel_calls):
    inputs = make_inputs((5,), 33, 17, 3, dtype, dropout=True)
    y, u = forward(*inputs[:5], SCALE, inputs[5])
    y_ref, u_ref = lora_ops.lora_linear_forward_reference(*inputs[:5], SCALE, inputs[5])
    assert torch.equal(y, y_ref) and torch.equal(u, u_ref)
    assert not kernel_calls, kernel_calls


# ---------------------------------------------------------------------------------------------
# The GEMM path's variants: bf16 weight widened tile by tile (multi-tile), and the plain low-precision
# GEMM that CUDA and CPUs with native bf16 matrix units (AVX512-BF16 / AMX) take.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def gemm_variant(monkeypatch):
    def use(variant: str) -> None:
        if variant == "upcast_tiled":  # tiles of 16 rows: many tiles and a ragged last one
            monkeypatch.setattr(_gemm, "_TILE_FLOATS", 64)
            upcast = lambda w: w.device.type == "cpu" and w.dtype != torch.float32  # noqa: E731
            monkeypatch.setattr(_gemm, "upcast_tiles_needed", upcast)
        elif variant == "native_lowp":
            monkeypatch.setattr(_gemm, "upcast_tiles_needed", lambda w: False)
        else:
            raise ValueError(variant)

    return use



GEMM_VARIANTS = [
    pytest.param("upcast_tiled", "y", id="upcast_tiled-y"),
    pytest.param("upcast_tiled", "u", id="upcast_tiled-u"),
    pytest.param("native_lowp", "y", id="native_lowp-y"),
    pytest.param("native_lowp", "u", id="native_lowp-u"),
]


@pytest.mark.parametrize("m", [17, 200], ids=["M17", "M200"])
@pytest.mark.parametrize("k,n", [(129, 257), (1000, 33)], ids=["129x257", "1000x33"])
@pytest.mark.parametrize("variant,output", GEMM_VARIANTS)
def test_gemm_variants_bf16_forward(variant, output, k, n, m, force_path, gemm_variant):
    force_path("gemm")
    gemm_variant(variant)
    x, weight, b, lora_a, lora_b, xa = make_inputs((m,), k, n, 16, torch.bfloat16, weight_layout="slice")
    y, u = forward(x, weight, b, lora_a, lora_b, SCALE, xa)
    y_ref, u_ref = lora_ops.lora_linear_forward_reference(x, weight, b, lora_a, lora_b, SCALE, xa)
    y64, u64 = lora_forward_fp64(x, weight, b, lora_a, lora_b, SCALE, xa)
    y_mag, u_mag = lora_forward_fp64(*map(absolute, (x, weight, b, lora_a, lora_b, SCALE, xa)))
    if output == "y":
        assert_error_within("y", y, y_ref, y64, y_mag)
    else:
        assert_error_within("u", u, u_ref, u64, u_mag)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["lora_bf16", "lora_fp32"])
@pytest.mark.parametrize("variant", ["upcast_tiled", "native_lowp"])
def test_gemm_variants_bf16_backward_input(variant, adapter_dtype, gemm_variant):
    gemm_variant(variant)
    dy = _randn(70, 257, dtype=torch.bfloat16, device="cpu")
    weight = _strided(257, 129, dtype=torch.bfloat16, device="cpu", std=0.1, how="slice")
    g = _randn(70, 5, dtype=torch.float32, device="cpu")
    lora_a = _randn(5, 129, dtype=adapter_dtype, device="cpu", std=0.1)
    _check_backward_input(dy, weight, g, lora_a)


# ---------------------------------------------------------------------------------------------
# Backward ops
# ---------------------------------------------------------------------------------------------
def _backward_adapter_fp64(grad_y, adapter_input, u, lora_a, lora_b, scale):
    n, (r, k) = lora_b.shape[0], lora_a.shape
    dy, xa, u2 = fp64(grad_y).reshape(-1, n), fp64(adapter_input).reshape(-1, k), fp64(u).reshape(-1, r)
    g = scale * dy @ fp64(lora_b)
    return g.t() @ xa, scale * dy.t() @ u2, g.reshape(u.shape)


def _check_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale=SCALE):
    args = (grad_y, adapter_input, u, lora_a, lora_b, scale)
    grad_a, grad_b, g = backward_adapter(*args)
    ref = lora_ops.lora_linear_backward_adapter_reference(*args)
    exact = _backward_adapter_fp64(*args)
    magnitude = _backward_adapter_fp64(*map(absolute, args))
    assert g.dtype == torch.float32 and grad_a.dtype == lora_a.dtype and grad_b.dtype == lora_b.dtype
    for name, got, r_, e, mag in zip(("grad_a", "grad_b", "g"), (grad_a, grad_b, g), ref, exact, magnitude):
        assert_error_within(name, got, r_, e, mag)


def _backward_input_fp64(grad_y, weight, g, lora_a):
    dx = fp64(grad_y) @ fp64(weight)
    return dx if g is None else dx + fp64(g) @ fp64(lora_a)


def _check_backward_input(grad_y, weight, g, lora_a):
    dx = backward_input(grad_y, weight, g, lora_a)
    dx_ref = lora_ops.lora_linear_backward_input_reference(grad_y, weight, g, lora_a)
    exact = _backward_input_fp64(grad_y, weight, g, lora_a)
    magnitude = _backward_input_fp64(*map(absolute, (grad_y, weight, g, lora_a)))
    assert dx.dtype == grad_y.dtype
    assert_error_within("grad_x", dx, dx_ref, exact, magnitude)


BACKWARD_MS = (1, 5, 64, 65, 200)
BACKWARD_SHAPES = ((7, 33), (129, 257), (1000, 17))
BACKWARD_RANKS = (1, 16)
BACKWARD_LEADS = {"2d": lambda m: (m,), "3d": lambda m: (2, max(1, m // 2))}


@pytest.mark.parametrize("lead", list(BACKWARD_LEADS))
@pytest.mark.parametrize("k,n", BACKWARD_SHAPES, ids=[f"{k}x{n}" for k, n in BACKWARD_SHAPES])
@pytest.mark.parametrize("r", BACKWARD_RANKS, ids=[f"r{r}" for r in BACKWARD_RANKS])
@pytest.mark.parametrize("m", BACKWARD_MS, ids=[f"M{m}" for m in BACKWARD_MS])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_backward_adapter_matches_fp64(device, dtype, adapter_dtype, m, r, k, n, lead):
    shape = BACKWARD_LEADS[lead](m)
    kw = dict(device=device, adapter_dtype=adapter_dtype, dropout=True)
    x, _, _, lora_a, lora_b, xa = make_inputs(shape, k, n, r, dtype, **kw)
    u = (fp64(xa) @ fp64(lora_a).t()).float()
    grad_y = _randn(*shape, n, dtype=dtype, device=device)
    _check_backward_adapter(grad_y, xa, u, lora_a, lora_b)


HAS_CPU_INPUT_GRAD_KERNEL = hasattr(_C, "lora_input_grad_cpu")


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("with_adapter", [True, False], ids=["with_g", "base_only"])
@pytest.mark.parametrize("k,n", BACKWARD_SHAPES, ids=[f"{k}x{n}" for k, n in BACKWARD_SHAPES])
@pytest.mark.parametrize("m", BACKWARD_MS, ids=[f"M{m}" for m in BACKWARD_MS])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_backward_input_matches_fp64(
    device, dtype, adapter_dtype, m, k, n, with_adapter, path, force_path, kernel_calls
):
    force_path(path)
    shape = (2, m // 2) if m in (64, 200) else (m,)  # 3-D input for some M
    kw = dict(device=device, adapter_dtype=adapter_dtype, weight_layout="slice")
    _, weight, _, lora_a, _, _ = make_inputs(shape, k, n, 3, dtype, **kw)
    grad_y = _randn(*shape, n, dtype=dtype, device=device)
    g = _randn(*shape, 3, dtype=torch.float32, device=device) if with_adapter else None
    _check_backward_input(grad_y, weight, g, lora_a if with_adapter else None)
    if device == "cpu" and HAS_CPU_INPUT_GRAD_KERNEL:
        assert ("lora_input_grad_cpu" in kernel_calls) == (path == "fused"), kernel_calls


@pytest.mark.skipif(not HAS_CPU_INPUT_GRAD_KERNEL, reason="this build has no CPU input-gradient kernel")
@pytest.mark.parametrize("with_adapter", [True, False], ids=["with_g", "base_only"])
@pytest.mark.parametrize("k,n", ISA_SHAPES, ids=[f"{k}x{n}" for k, n in ISA_SHAPES])
@pytest.mark.parametrize("m", ISA_MS, ids=[f"M{m}" for m in ISA_MS])
@pytest.mark.parametrize("dtype,adapter_dtype", ISA_DTYPES)
def test_input_grad_kernel_each_cpu_isa(cpu_isa, dtype, adapter_dtype, m, k, n, with_adapter, force_path, kernel_calls):
    force_path("fused")
    weight = _strided(n, k, dtype=dtype, device="cpu", std=k**-0.5, how="slice")
    lora_a = _randn(7, k, dtype=adapter_dtype, device="cpu", std=k**-0.5)
    grad_y = _randn(m, n, dtype=dtype, device="cpu")
    g = _randn(m, 7, dtype=torch.float32, device="cpu") if with_adapter else None
    _check_backward_input(grad_y, weight, g, lora_a if with_adapter else None)
    assert "lora_input_grad_cpu" in kernel_calls


@pytest.mark.skipif(not HAS_CPU_INPUT_GRAD_KERNEL, reason="this build has no CPU input-gradient kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_input_grad_kernel_thread_counts(dtype, force_path):
    """Partial sums per task: any thread count gives the same result within fp32 accumulation."""
    force_path("fused")
    old = torch.get_num_threads()
    try:
        # (M, N, K, r): N + r rows split over up to 8 tasks, including fewer rows than tasks
        for m, n, k, r in ((7, 517, 301, 6), (1, 1, 5, 1), (3, 2, 9, 2), (2, 13, 1030, 3)):
            weight, lora_a = _randn(n, k, dtype=dtype, device="cpu", std=0.05), _randn(r, k, dtype=dtype, device="cpu")
            grad_y, g = _randn(m, n, dtype=dtype, device="cpu"), _randn(m, r, dtype=torch.float32, device="cpu")
            for threads in (1, 2, 3, 8):
                torch.set_num_threads(threads)
                _check_backward_input(grad_y, weight, g, lora_a)
    finally:
        torch.set_num_threads(old)


# (M, K, N): one row of w and an odd count (the pair tail), N past the 128-row chunk with tasks split at
# odd rows, K under and past the 32-column step and the 128-column block (masked tails), M past the
# 8-row register tile (pairs kept for the later tiles) and not a multiple of it.
BF16_INPUT_GRAD_CASES = [(1, 7, 1), (3, 31, 9), (5, 70, 33), (8, 32, 64), (9, 130, 65), (16, 300, 129),
                         (17, 1030, 13), (24, 33, 200)]  # fmt: skip


@pytest.mark.skipif(not HAS_CPU_INPUT_GRAD_KERNEL, reason="this build has no CPU input-gradient kernel")
@pytest.mark.parametrize("dot", [True, False], ids=["dot", "widen"])
@pytest.mark.parametrize("m,k,n", BF16_INPUT_GRAD_CASES, ids=[f"M{m}-{k}x{n}" for m, k, n in BF16_INPUT_GRAD_CASES])
def test_input_grad_bf16_dy_either_choice(cpu_isa, dot, m, k, n, force_path, monkeypatch, kernel_calls):
    """``cpu_input_grad_bf16_rows``: a bf16 dy read as bf16 (AVX512-BF16 products over pairs of W's rows
    where the CPU and kernel variant have them, dy widened in the kernel elsewhere) or widened in the kernel:
    within the contract of float64 either way, with and without the adapter term (a bf16 or fp32 A), on
    one, two and three threads."""
    force_path("fused")
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_BF16_DOT", dot)
    old = torch.get_num_threads()
    try:
        for threads, adapter_dtype in ((1, torch.bfloat16), (2, torch.float32), (3, None)):
            torch.set_num_threads(threads)
            weight = _strided(n, k, dtype=torch.bfloat16, device="cpu", std=k**-0.5, how="slice")
            grad_y = _randn(m, n, dtype=torch.bfloat16, device="cpu")
            g = None if adapter_dtype is None else _randn(m, 5, dtype=torch.float32, device="cpu")
            lora_a = None if adapter_dtype is None else _randn(5, k, dtype=adapter_dtype, device="cpu", std=k**-0.5)
            _check_backward_input(grad_y, weight, g, lora_a)
    finally:
        torch.set_num_threads(old)
    assert "lora_input_grad_cpu" in kernel_calls


@pytest.mark.skipif(not HAS_CPU_INPUT_GRAD_KERNEL, reason="this build has no CPU input-gradient kernel")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_input_grad_kernel_bf16_dy_matches_widened_dy(cpu_isa, out_dtype):
    """``lora_input_grad_cpu`` with a bf16 dy (bf16 products, or widened in C++ where they are missing or
    ``bf16_dot`` is off) against the same dy widened to fp32 by the caller: the same exact products summed
    in another order, each within fp32 summation error of float64 (and half a bf16 ulp more for a bf16
    out). dy's rows strided; outputs poisoned: every element must be written, and nothing past dy's rows
    read into it."""
    from lowrank._validate import matrix

    torch.manual_seed(12)
    for m, k, n, tasks in ((1, 45, 19, 1), (6, 77, 65, 2), (19, 300, 131, 3)):
        dy = torch.randn(m, n + 3).bfloat16()[:, :n]
        dy.as_strided((m, 3), (n + 3, 1), n).fill_(float("nan"))  # beyond each row: must not be read
        w = (torch.randn(n, k) * n**-0.5).bfloat16()
        g, a = torch.randn(m, 4), (torch.randn(4, k) * 0.3).bfloat16()
        outs = []
        for dy_in, dot in ((dy, True), (dy, False), (dy.float(), True)):
            out = torch.full((m, k), float("nan"), dtype=out_dtype)
            ws = torch.full((tasks * m, k), float("nan"))
            _C.lora_input_grad_cpu(matrix("out", out), matrix("dy", dy_in), matrix("w", w), matrix("g", g),
                                   matrix("a", a), matrix("ws", ws), tasks, dot)  # fmt: skip
            outs.append(out)
        exact = dy.double() @ w.double() + g.double() @ a.double()
        mag = dy.double().abs() @ w.double().abs() + g.double().abs() @ a.double().abs()
        rounding = 2**-8 * exact.abs() if out_dtype == torch.bfloat16 else 0
        for out in outs:
            assert torch.isfinite(out).all()
            assert ((out.double() - exact).abs() <= rounding + (n + 8) * 2**-24 * mag).all(), (m, k, n)




@pytest.mark.parametrize(
    "path",
    [
        "fused",
        "gemm",
    ],
)
@pytest.mark.parametrize("m", [1, 5, 70], ids=["M1", "M5", "M70"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_backward_input_transposed_g_and_lora_a(dtype, m, path, force_path):
    """g and lora_a as transposed views (their last dimension strided): the op must copy and keep them."""
    force_path(path)
    k, n, r = 67, 33, 5
    weight = _randn(n, k, dtype=dtype, device="cpu", std=k**-0.5)
    grad_y = _strided(m, n, dtype=dtype, device="cpu", std=1.0, how="transposed")
    g = _strided(m, r, dtype=torch.float32, device="cpu", std=1.0, how="transposed")
    lora_a = _strided(r, k, dtype=dtype, device="cpu", std=k**-0.5, how="transposed")
    _check_backward_input(grad_y, weight, g, lora_a)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_backward_ops_empty_batch(device, dtype):
    k, n, r = 9, 5, 2
    lora_a, lora_b = _randn(r, k, dtype=dtype, device=device), _randn(n, r, dtype=dtype, device=device)
    weight = _randn(n, k, dtype=dtype, device=device)
    dy, xa = torch.empty(0, n, dtype=dtype, device=device), torch.empty(0, k, dtype=dtype, device=device)
    u = torch.empty(0, r, device=device)
    grad_a, grad_b, g = backward_adapter(dy, xa, u, lora_a, lora_b, SCALE)
    assert torch.equal(grad_a, torch.zeros_like(lora_a)) and torch.equal(grad_b, torch.zeros_like(lora_b))
    assert g.shape == (0, r)
    assert backward_input(dy, weight, u, lora_a).shape == (0, k)


# ---------------------------------------------------------------------------------------------
# Argument errors name the argument (TypeError for dtypes, ValueError for shapes)
# ---------------------------------------------------------------------------------------------
def test_forward_argument_errors():
    x, w, b, a, bb, _ = make_inputs((4,), 7, 9, 3, torch.float32)
    cases = [
        ((torch.randn(4, 8), w, b, a, bb, SCALE, None), ValueError, "weight"),
        ((x.bfloat16(), w, b, a, bb, SCALE, None), TypeError, "weight"),
        ((x.int(), w, b, a, bb, SCALE, None), TypeError, "x"),
        ((x, w, torch.randn(8), a, bb, SCALE, None), ValueError, "bias"),
        ((x, w, b.double(), a, bb, SCALE, None), TypeError, "bias"),
        ((x, w, b, torch.randn(3, 8), bb, SCALE, None), ValueError, "lora_a"),
        ((x, w, b, a, torch.randn(9, 4), SCALE, None), ValueError, "lora_b"),
        ((x, w, b, a, bb.double(), SCALE, None), TypeError, "lora_b"),
        ((x, w, b, a, bb, SCALE, torch.randn(4, 6)), ValueError, "adapter_input"),
        ((x, w, b, a, bb, SCALE, x.double()), TypeError, "adapter_input"),
        ((x, w.unsqueeze(0), b, a, bb, SCALE, None), ValueError, "weight"),
    ]
    for args, exc, name in cases:
        with pytest.raises(exc, match=name):
            forward(*args)


def test_backward_argument_errors():
    a, bb, w = torch.randn(3, 7), torch.randn(9, 3), torch.randn(9, 7)
    dy, xa, u = torch.randn(4, 9), torch.randn(4, 7), torch.randn(4, 3)
    with pytest.raises(ValueError, match="grad_y"):
        backward_adapter(torch.randn(4, 8), xa, u, a, bb, SCALE)
    with pytest.raises(ValueError, match="adapter_input"):
        backward_adapter(dy, torch.randn(5, 7), u, a, bb, SCALE)
    with pytest.raises(TypeError, match="u"):
        backward_adapter(dy, xa, u.double(), a, bb, SCALE)
    with pytest.raises(ValueError, match="lora_b"):
        backward_adapter(dy, xa, u, a, torch.randn(9, 4), SCALE)
    with pytest.raises(ValueError, match="grad_y"):
        backward_input(torch.randn(4, 8), w, u, a)
    with pytest.raises(ValueError, match="g and lora_a"):
        backward_input(dy, w, u, None)
    with pytest.raises(TypeError, match="g"):
        backward_input(dy, w, u.bfloat16(), a)
    with pytest.raises(TypeError, match="weight"):
        backward_input(dy, w.bfloat16(), u, a)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels, dispatch, AOT
# ---------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)




def _forward_samples():
    K, N, r = 7, 9, 3
    yield "basic", (_t(4, K), _t(N, K), _t(N), _t(r, K), _t(N, r), 2.0, None)
    yield "no_bias_dropout", (_t(5, K), _t(N, K), None, _t(r, K), _t(N, r), 0.5, _t(5, K))
    yield "3d_bf16_lora_fp32", (
        _t(2, 3, K, dtype=torch.bfloat16),
        _t(N, K, dtype=torch.bfloat16),
        _t(N, dtype=torch.bfloat16),
        _t(r, K),
        _t(N, r),
        2.0,
        _t(2, 3, K, dtype=torch.bfloat16),
    )
    yield "views", (_t(K, 4).t(), _t(N + 3, K + 5)[1 : N + 1, 2 : K + 2], _t(N), _t(K, r).t(), _t(r, N).t(), 2.0, None)
    yield "gemm_path", (_t(70, K), _t(N, K), _t(N), _t(r, K), _t(N, r), 2.0, _t(70, K))
    yield "empty-force_gemm", (_t(0, K), _t(N, K), _t(N), _t(r, K), _t(N, r), 2.0, None)
    yield pytest.param(
        "empty",
        (_t(0, K), _t(N, K), _t(N), _t(r, K), _t(N, r), 2.0, None)
    )
    yield pytest.param(
        "requires_grad",
        (_t(4, K, requires_grad=True), _t(N, K), _t(N), _t(r, K, requires_grad=True), _t(N, r, requires_grad=True))
        + (2.0, None)
    )


def _backward_adapter_samples():
    K, N, r = 7, 9, 3
    yield "basic", (_t(4, N), _t(4, K), _t(4, r), _t(r, K), _t(N, r), 2.0)
    bf16 = torch.bfloat16
    yield "3d_bf16_lora_fp32", (_t(2, 3, N, dtype=bf16), _t(2, 3, K, dtype=bf16), _t(2, 3, r), _t(r, K), _t(N, r), 0.5)
    yield "views", (_t(N, 4).t(), _t(4, K + 3)[:, 1 : K + 1], _t(4, r), _t(r, K), _t(N + 2, r)[1 : N + 1], 2.0)
    yield "empty", (_t(0, N), _t(0, K), _t(0, r), _t(r, K), _t(N, r), 2.0)
    yield pytest.param(
        "lora_a_transposed", (_t(4, N), _t(4, K), _t(4, r), _t(K, r).t(), _t(N, r), 2.0)
    )
    yield pytest.param(
        "u_transposed", (_t(4, N), _t(4, K), _t(r, 4).t(), _t(r, K), _t(N, r), 2.0)
    )
    yield pytest.param(
        "requires_grad",
        (_t(4, N, requires_grad=True), _t(4, K), _t(4, r), _t(r, K, requires_grad=True), _t(N, r), 2.0)
    )


def _backward_input_samples():
    K, N, r = 7, 9, 3
    yield "basic", (_t(4, N), _t(N, K), _t(4, r), _t(r, K))
    yield "base_only", (_t(4, N), _t(N, K), None, None)
    bf16 = torch.bfloat16
    yield "3d_bf16_lora_fp32", (_t(2, 3, N, dtype=bf16), _t(N, K, dtype=bf16), _t(2, 3, r), _t(r, K))
    w_view = _t(N + 3, K + 5)[1 : N + 1, 2 : K + 2]
    yield "views", (_t(N, 4).t(), w_view, _t(4, r + 2)[:, 1 : r + 1], _t(r, K + 3)[:, :K])
    yield pytest.param(
        "transposed_g_lora_a", (_t(4, N), _t(N, K), _t(r, 4).t(), _t(K, r).t())
    )
    yield "empty", (_t(0, N), _t(N, K), _t(0, r), _t(r, K))
    yield pytest.param(
        "requires_grad", (_t(4, N, requires_grad=True), _t(N, K), _t(4, r, requires_grad=True), _t(r, K))
    )


def _as_params(samples):
    out = []
    for s in samples:
        if hasattr(s, "marks"):  # a pytest.param carrying (id, args) and marks
            out.append(pytest.param(s.values[1], id=s.values[0], marks=s.marks))
        else:
            out.append(pytest.param(s[1], id=s[0]))
    return out


@pytest.mark.parametrize("args", _as_params(_forward_samples()))
def test_opcheck_forward(args, request, force_path):
    if "force_gemm" in request.node.callspec.id:
        force_path("gemm")
    torch.library.opcheck(forward, args)


@pytest.mark.parametrize("args", _as_params(_backward_adapter_samples()))
def test_opcheck_backward_adapter(args):
    torch.library.opcheck(backward_adapter, args)


@pytest.mark.parametrize("args", _as_params(_backward_input_samples()))
def test_opcheck_backward_input(args):
    torch.library.opcheck(backward_input, args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and lowrank's CUDA kernels")
@pytest.mark.cuda
def test_opcheck_cuda():
    K, N, r = 7, 9, 3
    c = lambda *s, dt=torch.float16: torch.randn(*s, device="cuda", dtype=dt)  # noqa: E731
    torch.library.opcheck(forward, (c(4, K), c(N, K), c(N), c(r, K), c(N, r), 2.0, c(4, K)))
    torch.library.opcheck(backward_adapter, (c(4, N), c(4, K), c(4, r, dt=torch.float32), c(r, K), c(N, r), 2.0))
    torch.library.opcheck(backward_input, (c(4, N), c(N, K), c(4, r, dt=torch.float32), c(r, K)))


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 through LoRALinearFunction
# ---------------------------------------------------------------------------------------------
def _y_only(*args):
    y, _ = lowrank.LoRALinearFunction.apply(*args)
    return y


def _f64(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize(
    "case",
    ["x_a_b_bias", "3d_no_bias", "weight_too", "adapter_input", "adapter_input_weight_3d", "only_lora"],
)
def test_gradcheck_lora_linear_function(case):
    K, N, r = 5, 4, 2
    lead = (2, 3) if "3d" in case else (3,)
    x = _f64(*lead, K, requires_grad=case != "only_lora")
    weight = _f64(N, K, requires_grad=case in ("weight_too", "adapter_input_weight_3d"))
    bias = None if "no_bias" in case else _f64(N, requires_grad=case != "only_lora")
    lora_a, lora_b = _f64(r, K), _f64(N, r)
    adapter_input = _f64(*lead, K) if case.startswith("adapter_input") else None
    args = (x, weight, bias, lora_a, lora_b, 1.5, adapter_input)
    assert torch.autograd.gradcheck(_y_only, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lora_linear_function_u_is_not_differentiable():
    args = (_f64(3, 5), _f64(4, 5, requires_grad=False), None, _f64(2, 5), _f64(4, 2), 1.0, None)
    y, u = lowrank.LoRALinearFunction.apply(*args)
    assert y.requires_grad and not u.requires_grad


@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "adapter_input"])
@pytest.mark.parametrize("m", [3, 70], ids=["fused", "gemm"])
@pytest.mark.parametrize("device,dtype,adapter_dtype", _adapter_dtype_params())
def test_lora_linear_function_grads_vs_fp64(device, dtype, adapter_dtype, m, dropout):
    """Gradients through the native ops vs float64 autograd on plain torch ops; the tolerance is
    PyTorch's own error when the same plain ops run in the same dtypes."""
    from conftest import plain_lora_linear

    K, N, r = 129, 67, 5
    leaves = make_inputs((m,), K, N, r, dtype, device=device, adapter_dtype=adapter_dtype, dropout=False)
    x, weight, b, lora_a, lora_b, _ = leaves
    xa = F.dropout(x, 0.25, training=True) if dropout else None
    grad_y = _randn(m, N, dtype=dtype, device=device)

    def run(cast, use_kernel):
        ins = [None if t is None else cast(t).detach().requires_grad_() for t in (x, weight, b, lora_a, lora_b)]
        xa_ = None if xa is None else cast(xa).detach().requires_grad_()
        if use_kernel:
            y, _ = lowrank.LoRALinearFunction.apply(*ins, SCALE, xa_)
        else:
            y = plain_lora_linear(*ins, SCALE, xa_)
        y.backward(cast(grad_y))
        return [y] + [t.grad for t in ins + [xa_] if t is not None]

    got = run(lambda t: t, True)
    same_dtype = run(lambda t: t, False)
    exact = run(fp64, False)
    names = ["y", "grad_x", "grad_weight", "grad_bias", "grad_a", "grad_b"]
    names += ["grad_adapter_input"] if dropout else []
    for name, g, s, e in zip(names, got, same_dtype, exact):
        assert_error_within(name, g, s, e)
