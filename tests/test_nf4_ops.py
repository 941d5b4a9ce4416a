"""NF4 format and ops (torch.ops.lowrank.nf4_*): bitsandbytes byte compatibility, exact decoding,
and the fused / tiled linear kernels against float64 on random data over odd shapes.

    y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ,   W = dequant(NF4 codes, double-quantized absmax)
"""

from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank import _C
from lowrank._validate import matrix
from lowrank.ops import _runtime
from lowrank.ops import nf4 as nf4_ops

from conftest import absolute, assert_error_within, fp64, max_error, plain_lora_linear

try:
    import bitsandbytes.functional as bnbF
except Exception:  # not installed, or fails to import on this machine
    bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes is not installed")


def bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__

forward = torch.ops.lowrank.nf4_linear_forward
backward_input = torch.ops.lowrank.nf4_linear_backward_input
BLOCKSIZES = (32, 64, 128, 256, 1024, 4096)
SCALE = 1.75


def weight_args(st: dict, shape, blocksize: int) -> tuple:
    return (st["codes"], st["absmax"], st["absmax2"], st["code2"], st["offset"], list(shape), blocksize, 256)


def quantized(n: int, k: int, blocksize: int = 64, double_quant: bool = True, std: float = 0.05):
    w = torch.randn(n, k) * std
    st = lowrank.quantize_nf4(w, blocksize, double_quant)
    return w, weight_args(st, (n, k), blocksize)


@pytest.fixture
def nf4_path(monkeypatch):
    """``nf4_path("fused" | "gemm")``: send every M to the fused NF4 rows kernel, or to the tiled GEMM."""

    def force(path: str) -> None:
        limit = (1 << 30) if path == "fused" else -1
        monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", limit)
        monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", limit)
        monkeypatch.setattr(_runtime, "CUDA_FUSED_MAX_M", limit)
        monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (0, 0, 0))  # the row-major kernels (test_nf4_tiled.py)

    return force


# ---------------------------------------------------------------------------------------------
# Format: pinned bytes (no bitsandbytes needed), and bitsandbytes as the oracle where installed
# ---------------------------------------------------------------------------------------------
def _pinned_weight():
    w = (torch.arange(70, dtype=torch.float32) * 0.37).sin().reshape(7, 10) * torch.linspace(0.1, 3, 70).reshape(7, 10)
    w[0, :] = 0
    return w


def test_pinned_bytes_double_quant():
    # Bytes written by bitsandbytes 0.50.2: quantize_4bit(w, blocksize=32, compress_statistics=True, "nf4").
    st = lowrank.quantize_nf4(_pinned_weight(), blocksize=32, double_quant=True)
    assert bytes(st["codes"].flatten().tolist()).hex() == (
        "777777777754323357acdeedc9521000357acddddb8532111247bdeffec9521000137c"
    )
    assert st["absmax"].tolist() == [0, 215, 223]
    assert st["absmax2"].tolist() == [0.9081995487213135]
    assert st["offset"].item() == 2.261655807495117
    assert torch.equal(st["code2"], nf4_ops.dynamic_map())


def test_pinned_bytes_odd_length_partial_block():
    # 5 values: one partial block (divided, absmax stored clamped), an odd count (the last low nibble is 7)
    st = lowrank.quantize_nf4(torch.tensor([[0.5, -1.25, 0.0, 3.0, -0.001]]), blocksize=32, double_quant=False)
    assert bytes(st["codes"].flatten().tolist()).hex() == "937f77"
    assert st["absmax"].tolist() == [3.0]


def test_dynamic_map_shape():
    m = nf4_ops.dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert bool((m[1:] >= m[:-1]).all()) and int((m == 0).sum()) == 1
    assert m[-1].item() == 1.0 and abs(m[0].item() + 0.99297) < 1e-4


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 128), (33, 101), (7, 5), (300, 4096), (1, 1)], ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_bytes_match_bitsandbytes(shape, blocksize, dtype):
    w = (torch.randn(*shape) * 0.02).to(dtype)
    w.view(-1)[: min(w.numel(), 2 * blocksize)] = 0  # an all-zero block or two
    st = lowrank.quantize_nf4(w, blocksize)
    q, ref = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(st["codes"], q)
    assert torch.equal(st["absmax"], ref.absmax)
    assert torch.equal(st["absmax2"], ref.state2.absmax)
    assert torch.equal(st["code2"], ref.state2.code)
    assert st["offset"].item() == ref.offset.item()
    # and the dense weight decodes to the bits bitsandbytes' own quantized state stands for. The oracle is
    # that state decoded by the reference, not bnb's dequantize_4bit, which is wrong on some CPUs (see
    # test_bitsandbytes_dequantize_agrees_with_its_state).
    ours = torch.ops.lowrank.nf4_dequantize(*weight_args(st, shape, blocksize), dtype)
    assert torch.equal(ours, _decode_bnb_state(q, ref, shape, blocksize, dtype))


def _decode_bnb_state(q, ref, shape, blocksize, dtype):
    """bitsandbytes' quantized state, decoded by lowrank's reference (pure PyTorch, the spec)."""
    return nf4_ops.nf4_dequantize_reference(q.reshape(-1, 1), ref.absmax, ref.state2.absmax, ref.state2.code, ref.offset,
                                            list(shape), blocksize, ref.state2.blocksize, dtype)  # fmt: skip


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 128), (33, 101), (300, 4096)], ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bitsandbytes_dequantize_agrees_with_its_state(shape, blocksize):
    """Records a peer's bug rather than failing on it: bitsandbytes 0.50.2's AVX-512 ``dequantize_4bit``
    decodes tensors of few blocks wrongly at blocksize >= 256 (its output disagrees with its own
    quantized state decoded by hand; lowrank's agrees). Where bnb is right this must hold exactly."""
    w = torch.randn(*shape) * 0.02
    q, ref = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    theirs = bnbF.dequantize_4bit(q, ref).reshape(shape)
    oracle = _decode_bnb_state(q, ref, shape, blocksize, torch.float32)
    if not torch.equal(theirs, oracle):
        assert blocksize >= 256, "bitsandbytes' decode disagrees with its state outside the known bug"
        pytest.xfail(f"bitsandbytes {bnb_version()} dequantize_4bit is wrong here (known: AVX-512, blocksize >= 256, "
                     f"few blocks); {int((theirs != oracle).sum())} of {theirs.numel()} values differ")


@needs_bnb
def test_bytes_match_bitsandbytes_large():
    w = torch.randn(1024, 4096)
    st = lowrank.quantize_nf4(w)
    q, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(st["codes"], q) and torch.equal(st["absmax"], ref.absmax)
    assert torch.equal(st["absmax2"], ref.state2.absmax)


@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_native_quantization_matches_reference(cpu_isa, blocksize):
    for shape in [(37, 101), (64, 4096), (3, 3)]:
        w = torch.randn(*shape) * 3
        codes, absmax = torch.ops.lowrank.nf4_quantize(w, blocksize)
        rc, ra = nf4_ops.nf4_quantize_reference(w, blocksize)
        assert torch.equal(codes, rc) and torch.equal(absmax, ra)
        offset = absmax.mean()
        q, a2 = torch.ops.lowrank.nf4_double_quant(absmax, offset, nf4_ops.dynamic_map(), 256)
        rq, ra2 = nf4_ops.nf4_double_quant_reference(absmax, offset, nf4_ops.dynamic_map(), 256)
        assert torch.equal(q, rq) and torch.equal(a2, ra2)


def test_zero_blocks_decode_to_zero():
    w = torch.randn(4, 256)
    w[1] = 0
    w[3, :64] = 0
    st = lowrank.quantize_nf4(w)
    dq = torch.ops.lowrank.nf4_dequantize(*weight_args(st, (4, 256), 64), torch.float32)
    assert bool((dq[1] == 0).all()) and bool((dq[3, :64] == 0).all())
    assert bool((dq[0] != 0).any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_raises(bad):
    w = torch.randn(8, 64)
    w[3, 17] = bad
    with pytest.raises(ValueError, match="weight: contains NaN or infinity"):
        torch.ops.lowrank.nf4_quantize(w, 64)
    with pytest.raises(ValueError, match="weight: contains NaN or infinity"):
        nf4_ops.nf4_quantize_reference(w, 64)


def test_partial_last_block_quantizes():
    w = torch.randn(3, 50)  # 150 values: two full blocks of 64 and a partial one of 22
    st = lowrank.quantize_nf4(w, 64)
    assert st["codes"].numel() == 75 and st["absmax"].numel() == 3
    dq = torch.ops.lowrank.nf4_dequantize(*weight_args(st, (3, 50), 64), torch.float32)
    assert (dq - w).abs().max() <= 0.2 * w.abs().max()


def test_quantization_error_of_standard_normal():
    # bitsandbytes reports 0.0728 for N(0, 1) data at blocksize 64
    w = torch.randn(1024, 1024)
    st = lowrank.quantize_nf4(w, 64)
    dq = torch.ops.lowrank.nf4_dequantize(*weight_args(st, (1024, 1024), 64), torch.float32)
    err = (dq - w).abs().mean().item()
    assert 0.070 < err < 0.076, err


@pytest.mark.parametrize("shape", [(37, 101), (16, 4096), (5, 192), (9, 33)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_dequantize_native_is_exact(cpu_isa, shape, blocksize, double_quant):
    _, args = quantized(*shape, blocksize, double_quant)
    ref32 = nf4_ops.nf4_dequantize_reference(*args, torch.float32)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        got = torch.ops.lowrank.nf4_dequantize(*args, dt)
        assert got.dtype == dt and got.shape == shape
        assert torch.equal(got, ref32.to(dt)), dt  # one rounding from the exact fp32 decode


def test_dequantize_row_tiles(cpu_isa):
    # the tiled GEMM path dequantizes row ranges [row0, row0 + rows) into a workspace
    _, args = quantized(70, 192, 64)
    full = nf4_ops.nf4_dequantize_reference(*args, torch.float32)
    w = nf4_ops._weight(*args)
    for row0, rows in [(0, 70), (3, 17), (69, 1), (10, 0)]:
        out = torch.full((rows, 192), float("nan"))
        nf4_ops._dequantize_into(out, w, row0)
        assert torch.equal(out, full[row0 : row0 + rows])


# ---------------------------------------------------------------------------------------------
# The linear ops against float64
# ---------------------------------------------------------------------------------------------
def _inputs(lead, n, k, r, dtype, *, blocksize=64, double_quant=True, bias=True, adapter=True, dropout=False):
    w, args = quantized(n, k, blocksize, double_quant)
    x = torch.randn(*lead, k).to(dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if bias else None
    la = (torch.randn(r, k) / math.sqrt(k)).to(dtype) if adapter else None
    lb = (torch.randn(n, r) * 0.1).to(dtype) if adapter else None
    xa = torch.nn.functional.dropout(x, 0.3) if dropout else None
    return args, x, b, la, lb, xa


def _exact(args, x, b, la, lb, xa):
    w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
    y = fp64(x) @ w.t()
    mag = absolute(x) @ w.abs().t()
    if la is not None:
        u = fp64(x if xa is None else xa) @ fp64(la).t()
        y = y + SCALE * (u @ fp64(lb).t())
        mag = mag + SCALE * (u.abs() @ absolute(lb).t())
    if b is not None:
        y, mag = y + fp64(b), mag + absolute(b)
    return y, mag


SHAPES = [((1,), 37, 128), ((2,), 64, 100), ((3,), 130, 192), ((5,), 11, 64), ((16,), 48, 256), ((2, 3), 40, 96),
          ((33,), 24, 320), ((1,), 7, 33)]  # fmt: skip


def _same_dtype_reference(yr, args, x, b, la, lb, xa, exact):
    """PyTorch's own error in x's dtype: the reference op (exact fp32 W, fp32 accumulation, one
    rounding) or, if farther from the exact answer, plain PyTorch with W decoded to x's dtype — what a
    16-bit GEMM over the decoded weight does (DESIGN: dequantize in fp32, round once to the compute
    dtype), as lowrank's many-token bf16 path does where torch's bf16 GEMM is the fast one."""
    if x.dtype == torch.float32:
        return yr
    w = nf4_ops.nf4_dequantize_reference(*args, x.dtype)
    plain = torch.nn.functional.linear(x, w, b) if la is None else plain_lora_linear(x, w, b, la, lb, SCALE, xa)
    return plain if max_error(plain, exact) > max_error(yr, exact) else yr


@pytest.mark.parametrize("lead,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_forward_vs_float64(cpu_isa, nf4_path, lead, n, k, dtype, path):
    nf4_path(path)
    for blocksize, double_quant, bias, adapter in [(64, True, True, True), (32, False, False, True),
                                                   (128, True, True, False)]:  # fmt: skip
        args, x, b, la, lb, xa = _inputs(lead, n, k, 5, dtype, blocksize=blocksize, double_quant=double_quant,
                                         bias=bias, adapter=adapter)  # fmt: skip
        y, u = forward(x, *args, b, la, lb, SCALE, xa)
        yr, ur = nf4_ops.nf4_linear_forward_reference(x, *args, b, la, lb, SCALE, xa)
        exact, mag = _exact(args, x, b, la, lb, xa)
        assert_error_within(f"y ({blocksize}, {double_quant}, {bias}, {adapter})", y, _same_dtype_reference(
            yr, args, x, b, la, lb, xa, exact), exact, mag)  # fmt: skip
        assert u.shape == ur.shape and u.dtype == torch.float32
        if adapter:
            assert torch.allclose(u, ur, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_forward_dropout_input(nf4_path, path):
    nf4_path(path)
    args, x, b, la, lb, xa = _inputs((4,), 40, 128, 3, torch.float32, dropout=True)
    y, _ = forward(x, *args, b, la, lb, SCALE, xa)
    yr, _ = nf4_ops.nf4_linear_forward_reference(x, *args, b, la, lb, SCALE, xa)
    exact, mag = _exact(args, x, b, la, lb, xa)
    assert_error_within("y", y, yr, exact, mag)


@pytest.mark.parametrize("k", [64, 128, 192, 576, 4096 + 192], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_single_row_kernel_vs_float64(cpu_isa, nf4_path, k, blocksize):
    """M = 1 (decode): whole chunks of 128 values and a last group of 64 (k = 192, 576), scales decoded
    ahead per chunk of 64 groups (k = 4288 crosses one), blocks straddling rows (k % blocksize != 0:
    e.g. 192 with blocksize 128), row counts not a multiple of four; the float64 answer within fp32
    rounding of the sum's magnitude."""
    nf4_path("fused")
    torch.manual_seed(k + blocksize)
    for n in (1, 6, 37):
        args, x, b, la, lb, xa = _inputs((1,), n, k, 3, torch.float32, blocksize=blocksize)
        y, _ = forward(x, *args, b, la, lb, SCALE, xa)
        exact, mag = _exact(args, x, b, la, lb, xa)
        err = (y.double() - exact).abs().max().item()
        assert err <= 8 * 2**-24 * mag.max().item(), (n, err)


needs_bf16_dot = pytest.mark.skipif(not _C.cpu_bf16_dot(), reason="this CPU has no AVX512-BF16 (its kernels are compiled, not run)")
DOT_CASES = [  # (k, blocksize): one table per chunk of 128 (blocksize >= 128 dividing k) or two (64; rows
    (64, 64), (192, 64), (576, 64), (4160, 64),  # straddling blocks); a last half chunk (k % 128 == 64);
    (256, 128), (192, 128), (4096, 4096), (640, 256), (128, 32),  # scales decoded ahead per 64 groups
]  # (4160); blocksize 32 (four scales per chunk: widened instead)


def _rows_call(x, args, b, u, lb, out_dtype, dot):
    """The CPU rows kernel called directly, its output poisoned (fp32 or bf16 out)."""
    from lowrank._validate import matrix, optional_matrix

    y = torch.full((x.shape[0], args[5][0]), float("nan"), dtype=out_dtype)
    _C.nf4_rows_cpu(matrix("out", y), matrix("x", x), nf4_ops._weight(*args), optional_matrix("bias", b),
                    optional_matrix("u", u), optional_matrix("e", lb), SCALE, 2, dot)  # fmt: skip
    return y


def _exact_widened(x, w, b, u, lb):
    """float64 over the exact fp32 W: what the widened path computes."""
    y = fp64(x) @ w.t()
    if b is not None:
        y = y + fp64(b)
    if u is not None:
        y = y + SCALE * fp64(u) @ fp64(lb).t()
    return y


@pytest.mark.parametrize("k,blocksize", DOT_CASES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17])
def test_bf16_rows_kernel_rounds_w_once(cpu_isa, k, blocksize, m):
    """bf16 x in the CPU rows kernel. With bf16_dot (AVX512-BF16 products, where the variant has them):
    W decoded in fp32 and rounded once to bf16, products and sums in fp32 (DESIGN: the contract of a
    16-bit compute dtype) — checked with an fp32 output against float64 over that bf16 W to fp32
    accumulation, which a wrong table, nibble or x position would miss by orders of magnitude. Without
    it (or without the instructions): x widened against the exact fp32 W. Every x-row tile (1, 2, 4, 8;
    3, 5, 9, 17 padded), 2 to 37 W rows (tails of the 4- and 2-row tiles)."""
    dot = _C.cpu_bf16_dot()
    for n, bias, adapter in [(37, True, True), (6, False, False), (2, True, False)]:
        args, x, b, la, lb, _ = _inputs((m,), n, k, 3, torch.bfloat16, blocksize=blocksize, bias=bias, adapter=adapter)
        u = (torch.randn(m, 3) if adapter else None)
        w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
        rounded = dot and blocksize >= 64
        w_used = w.to(torch.bfloat16).double() if rounded else w
        exact = fp64(x) @ w_used.t() + (fp64(b) if bias else 0) + (SCALE * fp64(u) @ fp64(lb).t() if adapter else 0)
        mag = absolute(x) @ w_used.abs().t() + (absolute(b) if bias else 0)
        mag = mag + (SCALE * absolute(u) @ absolute(lb).t() if adapter else 0)
        for flag in (True, False):
            y = _rows_call(x, args, b, u, lb, torch.float32, flag)
            err = ((y.double() - (exact if flag else _exact_widened(x, w, b, u, lb))).abs() / mag.clamp_min(1e-30)).max()
            # fp32 sums: k / 32 steps of two products per lane (two roundings each), then 16 lanes
            assert err <= (k / 16 + 16) * 2**-24, (flag, n, bias, adapter, err.item())
        y16 = _rows_call(x, args, b, u, lb, torch.bfloat16, True)  # one more rounding, to the output's bf16
        assert torch.isfinite(y16).all()
        assert ((y16.double() - exact).abs() <= 2**-8 * exact.abs() + (k / 16 + 16) * 2**-24 * mag).all()


@needs_bf16_dot
def test_bf16_dot_choice_reaches_the_layer(nf4_path, monkeypatch):
    """The measured choice is what the layer runs: pinned on, a bf16 NF4 layer's few-token output is the
    dot kernel's bit for bit (W rounded to bf16); pinned off, the widened kernel's (exact W, x widened
    once in Python) — and the two differ."""
    nf4_path("fused")
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(576, 96), compute_dtype=torch.bfloat16).eval()
    x = torch.randn(3, 576).bfloat16()
    outs = {}
    for dot in (True, False):
        monkeypatch.setattr(_runtime, "NF4_CPU_BF16_DOT", dot)
        with torch.no_grad():
            outs[dot] = layer(x)
        kernel = _rows_call(x if dot else x.float(), layer.weight_args(), layer.bias, None, None, torch.bfloat16, dot)
        assert torch.equal(outs[dot], kernel), dot
    assert not torch.equal(outs[True], outs[False])


@pytest.mark.parametrize("lead,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_backward_input_vs_float64(cpu_isa, nf4_path, lead, n, k, dtype, path, blocksize):
    nf4_path(path)
    args, _, _, la, _, _ = _inputs(lead, n, k, 4, dtype, blocksize=blocksize)
    dy = torch.randn(*lead, n).to(dtype)
    g = torch.randn(*lead, 4)
    for gg, aa in [(g, la), (None, None)]:
        dx = backward_input(dy, *args, gg, aa)
        dxr = nf4_ops.nf4_linear_backward_input_reference(dy, *args, gg, aa)
        w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
        exact, mag = fp64(dy) @ w, absolute(dy) @ w.abs()
        if gg is not None:
            exact, mag = exact + fp64(gg) @ fp64(aa), mag + absolute(gg) @ absolute(aa)
        if dtype != torch.float32:  # or a 16-bit GEMM over W decoded to dy's dtype (the bf16 tiles), if farther
            w16 = nf4_ops.nf4_dequantize_reference(*args, dtype)
            plain = dy @ w16 + (gg.to(dtype) @ aa if gg is not None else 0)
            dxr = plain if max_error(plain, exact) > max_error(dxr, exact) else dxr
        assert_error_within("grad_x", dx, dxr, exact, mag)


@pytest.mark.parametrize("m,n,k,blocksize", [(13, 300, 640, 32), (25, 129, 192, 64), (12, 65, 1024, 256),
                                             (40, 71, 128, 64), (7, 1000, 64, 64)], ids=str)
def test_backward_input_kernel_tiles(cpu_isa, nf4_path, m, n, k, blocksize):
    """The few-token input-gradient kernel past its tile sizes: dy rows split into tiles of at most 12
    (13 -> 7 + 6, 25 -> 3 tiles, 40 -> 4), more rows of W per task than one block of 64 (a partial last
    block), a dy view with a longer leading dimension, and a workspace poisoned before the call."""
    nf4_path("fused")
    args, _, _, _, _, _ = _inputs((m,), n, k, 4, torch.float32, blocksize=blocksize)
    dy = torch.randn(m, n + 3)[:, 1 : n + 1]
    assert not dy.is_contiguous()
    w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
    exact, mag = fp64(dy) @ w, absolute(dy) @ w.abs()
    dxr = nf4_ops.nf4_linear_backward_input_reference(dy, *args, None, None)
    assert_error_within("grad_x", backward_input(dy, *args, None, None), dxr, exact, mag)
    # the kernel itself, on a poisoned workspace and output
    tasks = 2
    workspace = torch.full((tasks * m, k), float("nan"))
    out = torch.full((m, k), float("nan"))
    _C.nf4_input_grad_cpu(matrix("out", out), matrix("grad_y", dy), nf4_ops._weight(*args), matrix("workspace", workspace),
                          tasks)  # fmt: skip
    assert_error_within("grad_x", out, dxr, exact, mag)


@pytest.mark.parametrize("m,n,k,blocksize", [(1, 37, 128, 64), (3, 130, 192, 32), (13, 301, 640, 64), (25, 64, 256, 256),
                                             (10, 65, 1024, 64)], ids=str)
@pytest.mark.parametrize("dot", [True, False], ids=["dot", "widen"])
def test_backward_input_kernel_bf16(cpu_isa, nf4_path, monkeypatch, m, n, k, blocksize, dot):
    """A bf16 dy read as it is by the few-token kernel: AVX512-BF16 products over W rounded once to bf16
    (row pairs; an odd row count ends with a zero row), or widened against the exact fp32 W (also what a
    kernel variant without the products does when asked for them). Either is within the error of the
    reference or of a bf16 GEMM over W decoded to bf16, whichever is farther from the exact result; the
    output is poisoned before the call."""
    nf4_path("fused")
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", dot)
    args, _, _, la, _, _ = _inputs((m,), n, k, 4, torch.bfloat16, blocksize=blocksize)
    dy = torch.randn(m, n).bfloat16()
    g = torch.randn(m, 4)
    w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
    for gg, aa in [(g, la), (None, None)]:
        exact, mag = fp64(dy) @ w, absolute(dy) @ w.abs()
        if gg is not None:
            exact, mag = exact + fp64(gg) @ fp64(aa), mag + absolute(gg) @ absolute(aa)
        dxr = nf4_ops.nf4_linear_backward_input_reference(dy, *args, gg, aa)
        plain = dy @ nf4_ops.nf4_dequantize_reference(*args, torch.bfloat16) + (gg.bfloat16() @ aa if gg is not None else 0)
        dxr = plain if max_error(plain, exact) > max_error(dxr, exact) else dxr
        assert_error_within("grad_x", backward_input(dy, *args, gg, aa), dxr, exact, mag)
    # the kernel alone (fp32 sums, no adapter term, not rounded): against the exact sum, poisoned output
    out = torch.full((m, k), float("nan"))
    _C.nf4_input_grad_cpu(matrix("out", out), matrix("grad_y", dy), nf4_ops._weight(*args),
                          matrix("workspace", torch.full((2 * m, k), float("nan"))), 2, dot)  # fmt: skip
    # |error| <= the rounding of W to bf16 where the products are bf16 (2^-9 of each |term|), plus fp32
    # sums of n exact products (and the tile's few partial sums added at the end): (n + 4) roundings
    exact = fp64(dy) @ w
    rounded_w = dot and _C.cpu_bf16_dot()  # (a variant without the products widens when asked for them)
    bound = (absolute(dy) @ w.abs()) * ((2.0**-9 if rounded_w else 0.0) + (n + 4) * 2.0**-24)
    assert torch.isfinite(out).all()
    assert ((out.double() - exact).abs() <= bound).all()


def test_backward_input_bf16_dot_from_m(monkeypatch, kernel_flags):
    """The bf16 products are taken from the measured M on (0: never; a bool pins every M), and the kernel
    receives that choice."""
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", 4)
    assert [_runtime.nf4_cpu_input_grad_bf16_dot(m) for m in (1, 3, 4, 16)] == [False, False, True, True]
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", 0)
    assert not any(_runtime.nf4_cpu_input_grad_bf16_dot(m) for m in (1, 4, 1 << 20))
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", True)
    assert _runtime.nf4_cpu_input_grad_bf16_dot(1)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", 1 << 30)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_BF16_DOT", 4)
    args, _, _, _, _, _ = _inputs((1,), 16, 64, 4, torch.bfloat16)
    for m, dot in [(3, False), (4, True)]:
        kernel_flags.clear()
        backward_input(torch.randn(m, 16).bfloat16(), *args, None, None)
        assert kernel_flags == [dot]


@pytest.fixture
def kernel_flags(monkeypatch):
    """The bf16_dot argument of each _C.nf4_input_grad_cpu call made during the test."""
    flags, original = [], _C.nf4_input_grad_cpu

    def spy(*args):
        flags.append(args[5])
        return original(*args)

    monkeypatch.setattr(_C, "nf4_input_grad_cpu", spy)
    return flags


@pytest.mark.parametrize("k,blocksize", [(576, 64), (200, 64), (192, 128), (640, 32), (4096, 4096)], ids=str)
@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "base"])
@pytest.mark.parametrize("direct", [True, False], ids=["into-rows", "buffer"])
def test_bf16_input_grad_column_tiles(cpu_isa, nf4_path, monkeypatch, k, blocksize, adapter, direct):
    """Many bf16 tokens where torch's bf16 GEMM is the fast one: the adapter's share ``g·A`` first (fp32
    sums rounded once to bf16), then W decoded to bf16 in column tiles of every row, one GEMM per tile
    adding ``dY·W`` onto it in its fp32 accumulator. Tiles forced to 64 columns here (many tiles, a short
    last one for k = 200; k % 64 != 0 decodes by the scalar path, k = 192 with blocksize 128 has blocks
    straddling rows), products straight into dx's columns or into a transposed buffer; each output
    against float64 over the bf16 W: one fp32 accumulation rounded once, after the term's own rounding."""
    nf4_path("gemm")
    monkeypatch.setattr(nf4_ops, "_COLUMN_TILE_VALUES", 1)  # -> 64-column tiles
    monkeypatch.setattr(nf4_ops._gemm, "cpu_bf16_gemm_native", lambda: True)
    monkeypatch.setattr(_runtime, "CPU_TILE_BUFFER_MAX_M", {torch.bfloat16: 0 if direct else 1 << 20})
    n, m = 75, 37
    args, _, _, la, _, _ = _inputs((m,), n, k, 4, torch.bfloat16, blocksize=blocksize)
    dy = torch.randn(m, n).bfloat16()
    g = torch.randn(m, 4) if adapter else None
    a = la if adapter else None
    dx = backward_input(dy, *args, g, a)
    w16 = nf4_ops.nf4_dequantize_reference(*args, torch.bfloat16).double()
    exact, mag, term = fp64(dy) @ w16, absolute(dy) @ w16.abs(), 0.0
    if adapter:
        term = fp64(g) @ fp64(a)
        exact, mag = exact + term, mag + absolute(g) @ absolute(a)
    assert dx.shape == (m, k) and dx.dtype == torch.bfloat16 and torch.isfinite(dx).all()
    bound = 2**-8 * exact.abs() + 2**-8 * abs(term) + (n + 16) * 2**-24 * mag
    assert ((dx.double() - exact).abs() <= bound).all(), ((dx.double() - exact).abs() - bound).max().item()


@pytest.mark.parametrize("n,k,blocksize", [(75, 576, 64), (200, 64, 64), (130, 192, 128), (33, 640, 32)], ids=str)
@pytest.mark.parametrize("adapter,bias", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["adapter-bias", "adapter", "bias", "base"])  # fmt: skip
@pytest.mark.parametrize("direct", [True, False], ids=["into-rows", "buffer"])
def test_bf16_forward_row_tiles(cpu_isa, nf4_path, monkeypatch, n, k, blocksize, adapter, bias, direct):
    """Many bf16 tokens where torch's bf16 GEMM is the fast one: the adapter term and bias first,
    ``c = bias + s·u Bᵀ`` (fp32 sums rounded once to bf16), then W decoded to bf16 in row tiles, one GEMM
    per tile adding ``x·Wᵀ`` onto c's columns in its fp32 accumulator. Tiles forced to 16 rows here (a
    short last one for most n), products straight into the output's columns or into a transposed
    buffer; each output against float64 over the bf16 W."""
    nf4_path("gemm")
    monkeypatch.setattr(nf4_ops._gemm, "_TILE_FLOATS", 1)  # -> 16-row tiles
    monkeypatch.setattr(nf4_ops._gemm, "cpu_bf16_gemm_native", lambda: True)
    monkeypatch.setattr(_runtime, "CPU_TILE_BUFFER_MAX_M", {torch.bfloat16: 0 if direct else 1 << 20})
    m = 37
    args, x, b, la, lb, _ = _inputs((m,), n, k, 4, torch.bfloat16, blocksize=blocksize, bias=bias, adapter=adapter)
    y, u = forward(x, *args, b, la, lb, SCALE, None)
    w16 = nf4_ops.nf4_dequantize_reference(*args, torch.bfloat16).double()
    exact, mag, term = fp64(x) @ w16.t(), absolute(x) @ w16.abs().t(), 0.0
    if adapter:
        u64 = fp64(x) @ fp64(la).t()
        term = SCALE * (u64 @ fp64(lb).t())
        mag = mag + SCALE * (u64.abs() @ absolute(lb).t())
        assert u.dtype == torch.float32 and torch.allclose(u.double(), u64, rtol=1e-5, atol=1e-5)
    if bias:
        term, mag = term + fp64(b), mag + absolute(b)
    exact = exact + term
    assert y.shape == (m, n) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    bound = 2**-8 * exact.abs() + 2**-8 * abs(term) + (k + 16) * 2**-24 * mag
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() - bound).max().item()


def test_dequantize_to_bf16_rounds_like_torch(cpu_isa):
    """The vectorized fp32 -> bf16 store of the decoder (csrc/cpu/simd.h) rounds as torch does: nearest
    even (ties both ways), denormals, overflow to inf, inf and NaN — the scales set by hand (no double
    quantization) so that table value x absmax lands on each."""
    n, k = 4, 128  # 8 blocks
    _, args = quantized(n, k, 64, double_quant=False)
    absmax = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-39, 3.3e38, float("inf"), float("nan"), 0.7])
    args = (args[0], absmax) + args[2:]
    exact = nf4_ops.nf4_dequantize_reference(*args, torch.float32)
    got = torch.ops.lowrank.nf4_dequantize(*args, torch.bfloat16)
    assert torch.equal(got.isnan(), exact.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(exact.to(torch.bfloat16)))
    # Equal scales share a bf16 code book in the AVX-512 decoder; +0 and -0 must not (their zeros differ
    # in sign, which torch.equal does not see: the bits are compared).
    absmax = torch.tensor([0.0, -0.0, -0.0, 0.0, 2.0, 2.0, -0.0, 0.5])
    args = (args[0], absmax) + args[2:]
    exact = nf4_ops.nf4_dequantize_reference(*args, torch.float32).to(torch.bfloat16)
    got = torch.ops.lowrank.nf4_dequantize(*args, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), exact.view(torch.int16))


@pytest.mark.parametrize("k,blocksize", [(576, 64), (200, 64), (192, 128), (640, 32), (4096, 4096), (128, 256)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_column_tiles_match_the_reference(cpu_isa, k, blocksize, dtype):
    """``nf4_dequantize_cpu(..., col0)``: rows [row0, row0 + rows) and columns [col0, col0 + cols) of the
    decoded weight, bit for bit, into a poisoned strided view — tiles on and off group boundaries, a last
    short one, one column; past the weight's end it raises naming col0."""
    from lowrank._validate import matrix

    n = 7
    _, args = quantized(n, k, blocksize)
    ref = nf4_ops.nf4_dequantize_reference(*args, dtype)
    w = nf4_ops._weight(*args)
    for row0, rows, col0, cols in [(0, n, 0, k), (1, 5, 64, 64), (2, 3, k - 64, 64), (0, n, 64, k - 64),
                                   (3, 4, 1, 37), (0, 1, k - 1, 1), (0, n, 128 % k, k - 128 % k)]:  # fmt: skip
        buf = torch.full((rows, cols + 3), float("nan"), dtype=dtype)
        out = buf[:, 1 : cols + 1]
        _C.nf4_dequantize_cpu(w, row0, matrix("out", out), 2, col0)
        assert torch.equal(out, ref[row0 : row0 + rows, col0 : col0 + cols]), (row0, rows, col0, cols)
        assert buf[:, 0].isnan().all() and buf[:, cols + 1 :].isnan().all()
    with pytest.raises(ValueError, match="^col0: the column tile runs past the weight"):
        _C.nf4_dequantize_cpu(w, 0, matrix("out", torch.empty(n, 64, dtype=dtype)), 2, k - 63)
    with pytest.raises(ValueError, match="^col0"):
        _C.nf4_dequantize_cpu(w, 0, matrix("out", torch.empty(n, 1, dtype=dtype)), 2, -1)


def test_empty_inputs():
    args, x, b, la, lb, _ = _inputs((0,), 16, 64, 2, torch.float32)
    y, u = forward(x, *args, b, la, lb, SCALE, None)
    assert y.shape == (0, 16) and u.shape == (0, 2)


def test_gradcheck_through_dequantized_path():
    args, x, b, la, lb, _ = _inputs((3,), 6, 64, 2, torch.float64)
    x, b, la, lb = (t.detach().requires_grad_() for t in (x, b, la, lb))

    def f(x, b, la, lb):
        return lowrank.NF4LinearFunction.apply(x, *args, b, la, lb, SCALE, None)[0]

    assert torch.autograd.gradcheck(f, (x, b, la, lb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_matches_plain_torch(dtype):
    args, x, b, la, lb, _ = _inputs((2, 5), 40, 128, 4, dtype)
    leaves = [t.detach().requires_grad_() for t in (x, b, la, lb)]
    y, _ = lowrank.NF4LinearFunction.apply(leaves[0], *args, leaves[1], leaves[2], leaves[3], SCALE, None)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, b, la, lb)]
    w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
    xr, br, lar, lbr = ref_leaves
    yr = xr @ w.t() + br + SCALE * ((xr @ lar.t()) @ lbr.t())
    yr.backward(dy.double())
    for got, ref, name in zip(leaves, ref_leaves, ["x", "bias", "lora_a", "lora_b"]):
        # the inputs are the same rounded values: only fp32 accumulation and one output rounding differ
        tol = 1e-5 if dtype == torch.float32 else 2**-7  # two bf16 units in the last place
        scale = ref.grad.abs().max().item()
        assert (got.grad.double() - ref.grad).abs().max().item() <= tol * scale, name


def test_opcheck():
    from torch.library import opcheck

    args, x, b, la, lb, _ = _inputs((3,), 24, 128, 2, torch.float32)
    opcheck(torch.ops.lowrank.nf4_linear_forward.default, (x, *args, b, la, lb, SCALE, None))
    opcheck(torch.ops.lowrank.nf4_linear_forward.default, (x, *args, None, None, None, 1.0, None))
    dy = torch.randn(3, 24)
    opcheck(torch.ops.lowrank.nf4_linear_backward_input.default, (dy, *args, torch.randn(3, 2), la))
    opcheck(torch.ops.lowrank.nf4_dequantize.default, (*args, torch.float32))
    opcheck(torch.ops.lowrank.nf4_quantize.default, (torch.randn(5, 70), 64))
    st = lowrank.quantize_nf4(torch.randn(40, 64), 64, double_quant=False)
    opcheck(torch.ops.lowrank.nf4_double_quant.default, (st["absmax"], st["absmax"].mean(), nf4_ops.dynamic_map(), 256))


# ---------------------------------------------------------------------------------------------
# Bad input: clear exceptions naming the argument
# ---------------------------------------------------------------------------------------------
def test_bad_arguments():
    args, x, b, la, lb, _ = _inputs((2,), 16, 64, 2, torch.float32)
    codes, absmax, absmax2, code2, offset, shape, bs, bs2 = args
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.lowrank.nf4_quantize(torch.randn(4, 64), 48)
    with pytest.raises(TypeError, match="weight"):
        torch.ops.lowrank.nf4_quantize(torch.randn(4, 64).double(), 64)
    with pytest.raises(ValueError, match="x: expected"):
        forward(torch.randn(2, 63), *args, b, la, lb, SCALE, None)
    with pytest.raises(ValueError, match="codes"):
        forward(x, codes[:-1], absmax, absmax2, code2, offset, shape, bs, bs2, b, la, lb, SCALE, None)
    with pytest.raises(ValueError, match="absmax2, code2 and offset"):
        forward(x, codes, absmax, None, code2, offset, shape, bs, bs2, b, la, lb, SCALE, None)
    with pytest.raises(ValueError, match="absmax"):
        forward(x, codes, absmax[:-1], absmax2, code2, offset, shape, bs, bs2, b, la, lb, SCALE, None)
    with pytest.raises(ValueError, match="lora_a"):
        forward(x, *args, b, la[:, :-1], lb, SCALE, None)
    with pytest.raises(ValueError, match="lora_a and lora_b"):
        forward(x, *args, b, la, None, SCALE, None)
    with pytest.raises(ValueError, match="bias"):
        forward(x, *args, b[:-1], la, lb, SCALE, None)
    with pytest.raises(ValueError, match="shape"):
        forward(x, codes, absmax, absmax2, code2, offset, [16, 64, 1], bs, bs2, b, la, lb, SCALE, None)
    with pytest.raises(ValueError, match="grad_y"):
        backward_input(torch.randn(2, 15), *args, None, None)


def test_binding_rechecks_sizes():
    # the C++ layer never trusts its caller: a bad blocksize reaching it is a ValueError, not a crash
    with pytest.raises(ValueError, match="blocksize"):
        _C.Nf4Weight(1, 1, 64, 48, 1, 0, 0, 0, 0, 256, -1)


# ---------------------------------------------------------------------------------------------
# CUDA: the same math as the CPU (skipped without a GPU and lowrank's CUDA kernels)
# ---------------------------------------------------------------------------------------------
_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and nf4_ops.HAS_CUDA_KERNELS), reason="needs a CUDA device and lowrank's CUDA kernels"
)


@_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 128), (33, 101), (300, 4096), (7, 5)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_cuda_quantization_matches_cpu(shape, blocksize):
    w = torch.randn(*shape) * 0.02
    w.view(-1)[:blocksize] = 0
    codes, absmax = torch.ops.lowrank.nf4_quantize(w, blocksize)
    gcodes, gabsmax = torch.ops.lowrank.nf4_quantize(w.cuda(), blocksize)
    assert torch.equal(gcodes.cpu(), codes) and torch.equal(gabsmax.cpu(), absmax)
    # double quantization with the same offset (torch.mean may round differently on the two devices)
    offset, code2 = absmax.mean(), nf4_ops.dynamic_map()
    q, a2 = torch.ops.lowrank.nf4_double_quant(absmax, offset, code2, 256)
    gq, ga2 = torch.ops.lowrank.nf4_double_quant(absmax.cuda(), offset.cuda(), code2.cuda(), 256)
    assert torch.equal(gq.cpu(), q) and torch.equal(ga2.cpu(), a2)
    cpu = lowrank.quantize_nf4(w, blocksize)
    gpu = {k: v.cuda() for k, v in cpu.items()}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        d_gpu = torch.ops.lowrank.nf4_dequantize(*weight_args(gpu, shape, blocksize), dt)
        d_cpu = torch.ops.lowrank.nf4_dequantize(*weight_args(cpu, shape, blocksize), torch.float32).to(dt)
        assert torch.equal(d_gpu.cpu(), d_cpu), dt


@_cuda
@pytest.mark.cuda
def test_cuda_non_finite_raises():
    w = torch.randn(8, 64, device="cuda")
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        torch.ops.lowrank.nf4_quantize(w, 64)


@_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("lead,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_cuda_forward_vs_float64(nf4_path, lead, n, k, dtype, path):
    nf4_path(path)
    for blocksize, double_quant, bias, adapter in [(64, True, True, True), (32, False, False, True),
                                                   (128, True, True, False)]:  # fmt: skip
        args, x, b, la, lb, xa = _inputs(lead, n, k, 5, dtype, blocksize=blocksize, double_quant=double_quant,
                                         bias=bias, adapter=adapter)  # fmt: skip
        exact, mag = _exact(args, x, b, la, lb, xa)
        to = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
        gargs = tuple(to(t) for t in args)
        y, _ = forward(to(x), *gargs, to(b), to(la), to(lb), SCALE, None)
        yr, _ = nf4_ops.nf4_linear_forward_reference(x, *args, b, la, lb, SCALE, None)
        assert_error_within(f"y ({blocksize}, {double_quant})", y.cpu(), yr, exact, mag)
        dy = torch.randn(*lead, n).to(dtype)
        dx = backward_input(dy.cuda(), *gargs, None, None)
        dxr = nf4_ops.nf4_linear_backward_input_reference(dy, *args, None, None)
        w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
        assert_error_within("grad_x", dx.cpu(), dxr, fp64(dy) @ w, absolute(dy) @ w.abs())
