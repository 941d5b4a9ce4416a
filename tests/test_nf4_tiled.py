"""The tiled NF4 inference layout (csrc/nf4.h "the inference layout", csrc/cpu/nf4_tiled.cpp,
ops/nf4.py ``TiledWeight``): its bytes decoded by an independent Python reading of the layout, its
kernel against float64 on odd shapes with poisoned outputs, the layer's use of it (and its staleness
rules), and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank import _C
from lowrank._validate import matrix, optional_matrix
from lowrank.ops import _runtime
from lowrank.ops import nf4 as nf4_ops

from conftest import absolute, fp64

SCALE = 1.75
HAS_TILED = _C.nf4_tiled_available(_C.DType.float32)
needs_tiled = pytest.mark.skipif(not HAS_TILED, reason="the tiled NF4 kernel needs the avx512 CPU kernel variant")
TILED_DTYPES = [torch.float32] + ([torch.bfloat16] if _C.nf4_tiled_available(_C.DType.bfloat16) else [])


def quantized(n: int, k: int, blocksize: int = 64, double_quant: bool = True):
    st = lowrank.quantize_nf4(torch.randn(n, k) * 0.05, blocksize, double_quant)
    return (st["codes"], st["absmax"], st["absmax2"], st["code2"], st["offset"], [n, k], blocksize, 256)


def unpack_reference(tw: nf4_ops.TiledWeight, n: int, k: int, blocksize: int) -> torch.Tensor:
    """W (fp32) read back from the tiled copy by the layout as nf4.h states it, in plain Python."""
    table = nf4_ops.nf4_table()
    tiles, chunks = (n + 15) // 16, k // 8
    codes = tw.codes.view(tiles, chunks, 16, 4)  # [tile][chunk][dword j][byte q]
    lo, hi = (codes & 0x0F).long(), (codes >> 4).long()
    code = torch.empty(tiles, 16, k, dtype=torch.long)
    for j in range(16):
        for q in range(4):
            col = torch.arange(chunks) * 8 + 2 * q + j % 2
            code[:, j // 2, col] = lo[:, :, j, q]
            code[:, 8 + j // 2, col] = hi[:, :, j, q]
    scales = tw.scales.view(tiles, k // blocksize, 16).transpose(1, 2).repeat_interleave(blocksize, dim=2)
    w = (table[code] * scales).reshape(tiles * 16, k)
    assert (code.reshape(tiles * 16, k)[n:] == 7).all() and (w[n:] == 0).all()  # padding rows: code 7, scale 0
    return w[:n]


@needs_tiled
@pytest.mark.parametrize(
    "n,k,blocksize,double_quant",
    [(37, 128, 32, True), (16, 64, 64, True), (100, 576, 64, False), (1, 4096, 4096, True), (33, 1024, 256, True),
     (17, 256, 128, False)],
    ids=str,
)  # fmt: skip
def test_layout_decodes_to_the_weight(n, k, blocksize, double_quant):
    """Every code and scale of the tiled copy, read back by the layout's definition, is the weight:
    bit for bit against the reference dequantization (rows padded to 16 with zeros)."""
    args = quantized(n, k, blocksize, double_quant)
    tw = nf4_ops.TiledWeight(nf4_ops._weight(*args))
    assert tw.codes.numel() == (n + 15) // 16 * k * 8
    want = nf4_ops.nf4_dequantize_reference(*args, torch.float32)
    assert torch.equal(unpack_reference(tw, n, k, blocksize), want)


def tiled_call(x, tw, b, u, lb, out_dtype, *, threads=2, ld_pad=0, scale=SCALE):
    """The tiled kernel called directly, into a poisoned (and, with ld_pad, strided) output."""
    m, n = x.shape[0], tw.view.rows
    y = torch.full((m, n + ld_pad), float("nan"), dtype=out_dtype)[:, :n]
    _C.nf4_rows_tiled_cpu(matrix("out", y), matrix("x", x), tw.view, optional_matrix("bias", b), optional_matrix("u", u),
                           optional_matrix("e", lb), scale, threads)  # fmt: skip
    return y


@needs_tiled
@pytest.mark.parametrize("dtype", TILED_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("k,blocksize", [(64, 64), (576, 64), (256, 32), (2048, 1024)], ids=str)
def test_kernel_vs_float64(dtype, m, k, blocksize):
    """fp32 x: exact W, fp32 products and sums. bf16 x: W decoded in fp32 and rounded once to bf16
    (DESIGN's contract for a 16-bit compute dtype), exact products, fp32 sums. Checked with an fp32
    output against float64, relative to the sum of |terms|; a bf16 output adds its one rounding. Row counts
    that leave a short last tile (1, 15, 37), every x-row block (1, 2, 4, 8, 16 and padded ones), with and
    without bias and adapter (fp32 and bf16 B), x and out strided."""
    for n, bias, adapter, e_dtype in [(37, True, True, torch.float32), (15, False, False, None), (1, True, True, dtype),
                                      (16, False, True, torch.bfloat16)]:  # fmt: skip
        args = quantized(n, k, blocksize)
        tw = nf4_ops.TiledWeight(nf4_ops._weight(*args))
        x = torch.randn(m, k + 5).to(dtype)[:, :k]  # rows k + 5 apart
        b = torch.randn(n).to(dtype) if bias else None
        u = torch.randn(m, 3) if adapter else None
        lb = torch.randn(n, 3).to(e_dtype) if adapter else None
        w = nf4_ops.nf4_dequantize_reference(*args, torch.float32).double()
        w_used = w.to(torch.bfloat16).double() if dtype == torch.bfloat16 else w
        exact = fp64(x) @ w_used.t() + (fp64(b) if bias else 0) + (SCALE * fp64(u) @ fp64(lb).t() if adapter else 0)
        mag = absolute(x) @ w_used.abs().t() + (absolute(b) if bias else 0)
        mag = mag + (SCALE * absolute(u) @ absolute(lb).t() if adapter else 0)
        y = tiled_call(x, tw, b, u, lb, torch.float32, ld_pad=3)
        assert torch.isfinite(y).all()
        err = ((y.double() - exact).abs() / mag.clamp_min(1e-30)).max().item()
        # A lane sums its k/2 column pairs in one to four running fp32 sums: random-sign rounding errors
        # grow as sqrt(k/2) (~32 at k = 2048), k/16 + 16 units leaves several sigma and still fails any
        # wrong code, column or scale by orders of magnitude.
        assert err <= (k / 16 + 16) * 2**-24, (n, bias, adapter, err)
        y16 = tiled_call(x, tw, b, u, lb, torch.bfloat16)
        assert torch.isfinite(y16).all()
        assert ((y16.double() - exact).abs() <= 2**-8 * exact.abs() + (k / 16 + 16) * 2**-24 * mag).all()
        assert torch.equal(tiled_call(x, tw, b, u, lb, torch.float32, threads=1), y)  # the same bits on 1 thread


@needs_tiled
def test_bad_input_raises_naming_the_argument():
    args = quantized(20, 128)
    w = nf4_ops._weight(*args)
    tw = nf4_ops.TiledWeight(w)
    x = torch.randn(2, 128)
    y = torch.empty(2, 20)
    with pytest.raises(ValueError, match="x"):
        _C.nf4_rows_tiled_cpu(matrix("out", y), matrix("x", torch.randn(2, 64)), tw.view, None, None, None, 1.0, 2)
    with pytest.raises(ValueError, match="out"):
        _C.nf4_rows_tiled_cpu(matrix("out", torch.empty(2, 21)), matrix("x", x), tw.view, None, None, None, 1.0, 2)
    with pytest.raises(ValueError, match="x: unsupported dtype"):
        _C.nf4_rows_tiled_cpu(matrix("out", y), matrix("x", x.half()), tw.view, None, None, None, 1.0, 2)
    with pytest.raises(ValueError, match="v and e"):
        _C.nf4_rows_tiled_cpu(matrix("out", y), matrix("x", x), tw.view, None, matrix("u", torch.randn(2, 3)), None,
                               1.0, 2)  # fmt: skip
    with pytest.raises(ValueError, match="blocksize"):  # rows not made of whole blocks
        _C.Nf4Tiled(tw.codes.data_ptr(), tw.scales.data_ptr(), 20, 96, 64)
    other = nf4_ops._weight(*quantized(20, 96, 32))
    with pytest.raises(ValueError, match="tiled: shape or blocksize"):
        _C.nf4_tile_cpu(other, tw.view, 2)
    odd = nf4_ops._weight(*quantized(20, 96, 64))
    assert not _C.nf4_tileable(odd) and not nf4_ops.TiledWeight.supported([20, 96], 64, torch.float32)
    with pytest.raises(ValueError, match="in_features % blocksize"):
        nf4_ops.TiledWeight(odd)


def test_variants_without_the_kernel_say_so(cpu_isa):
    """Every kernel variant answers whether it has the tiled kernel; those without it raise a clear
    error rather than run (the dispatch never picks the layout there)."""
    has = cpu_isa.startswith("avx512")
    assert _C.nf4_tiled_available(_C.DType.float32) == has
    assert _C.nf4_tiled_available(_C.DType.bfloat16) == (has and _C.cpu_bf16_dot())
    assert not _C.nf4_tiled_available(_C.DType.float16)
    if not has:
        pw_view = _C.Nf4Tiled(1, 1, 16, 64, 64)  # never read: the call raises first
        with pytest.raises(ValueError, match="avx512"):
            _C.nf4_rows_tiled_cpu(matrix("out", torch.empty(1, 16)), matrix("x", torch.randn(1, 64)), pw_view, None,
                                   None, None, 1.0, 2)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiled_on(monkeypatch):
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 0))


@needs_tiled
@pytest.mark.parametrize("dtype", TILED_DTYPES, ids=lambda d: str(d)[6:])
def test_layer_inference_runs_the_tiled_kernel(tiled_on, dtype):
    """Without gradients a layer's few-token call is the tiled kernel's output bit for bit (with and
    without an adapter), made once and reused; training frees the copy, and with the layout off the
    row kernels answer again."""
    base = torch.nn.Linear(576, 70)
    layer = lowrank.QLoRALinear.from_linear(base, r=4, compute_dtype=dtype).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 576).to(dtype)
    with torch.no_grad():
        y = layer(x)
        made = layer._frozen.tiled
        assert made is not None and layer(x) is not None and layer._frozen.tiled is made  # reused
    tw = made[1]
    wargs = layer.weight_args()
    x2 = x.reshape(10, 576)
    u = nf4_ops._lora.down_projection(x2.float(), layer.lora_A.weight, dtype)  # u as the layer makes it
    want = tiled_call(x2, tw, layer.bias, u, layer.lora_B.weight, dtype, scale=layer.scaling)
    want = want.reshape(2, 5, 70)
    assert torch.equal(y, want)
    exact = fp64(x2) @ nf4_ops.nf4_dequantize_reference(*wargs, torch.float32).double().t() + fp64(layer.bias)
    exact = exact + layer.scaling * fp64(u) @ fp64(layer.lora_B.weight).t()
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(y.reshape(10, 70).double(), exact, atol=tol * exact.abs().max().item(), rtol=tol)
    layer.train()
    assert layer._frozen.tiled is None


@needs_tiled
def test_tiled_copy_follows_the_weight(tiled_on, monkeypatch):
    """New values written into the same buffers (load_state_dict copies in place) remake the tiled copy;
    so does a new tensor. A deep copy starts without one."""
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(128, 48)).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = layer(x)
    other = lowrank.NF4Linear.from_linear(torch.nn.Linear(128, 48))
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        after = layer(x)
        want = other.eval()(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, want)
    made = layer._frozen.tiled
    with torch.no_grad():
        layer(x.bfloat16()).float()  # another dtype (and its views) reuse the copy
        layer(x)
    assert layer._frozen.tiled is made
    clone = copy.deepcopy(layer)
    assert clone._frozen.tiled is None
    with torch.no_grad():
        assert torch.equal(clone(x), want)


@needs_tiled
def test_tiled_inference_can_be_turned_off(tiled_on, monkeypatch):
    """``tiled_inference = False`` keeps a layer's inference on the codes as stored: the copy it held is
    freed and the row kernels answer (the same bits as with the layout pinned off)."""
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(128, 48)).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
        assert layer._frozen.tiled is not None
        layer.tiled_inference = False
        y = layer(x)
    assert layer._frozen.tiled is None
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (0, 0, 0))
    layer.tiled_inference = True
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@needs_tiled
def test_layout_off_or_unsupported_uses_the_row_kernels(monkeypatch):
    """Pinned off, or a weight whose rows are not whole blocks, never makes a tiled copy."""
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (0, 0, 0))
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(128, 48)).eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert layer._frozen.tiled is None
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 0))
    odd = lowrank.NF4Linear.from_linear(torch.nn.Linear(96, 48), blocksize=64).eval()
    with torch.no_grad():
        y = odd(torch.randn(2, 96))
    assert odd._frozen.tiled is None and torch.isfinite(y).all()


@pytest.mark.skipif(torch.bfloat16 not in TILED_DTYPES, reason="needs AVX512-BF16")
def test_bf16_x_widened_where_chosen(monkeypatch):
    """With the widening choice pinned on, a bf16 layer's few-token call is the tiled kernel over x
    widened to fp32 (exact W), bit for bit; pinned off, over the bf16 x (W rounded to bf16): they differ."""
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(256, 40), compute_dtype=torch.bfloat16).eval()
    x = torch.randn(3, 256).bfloat16()
    outs = {}
    for widen in (True, False):
        monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, (1 << 30) if widen else 0))
        with torch.no_grad():
            outs[widen] = layer(x)
        tw = layer._frozen.tiled[1]
        want = tiled_call(x.float() if widen else x, tw, layer.bias, None, None, torch.bfloat16, scale=1.0)
        assert torch.equal(outs[widen], want), widen
    assert not torch.equal(outs[True], outs[False])


@needs_tiled
def test_bf16_x_without_bf16_products_is_widened(monkeypatch):
    """On an AVX-512 CPU without AVX512-BF16 the probe sends every tiled bf16 call to the fp32 kernel
    (x widened), and the layer then takes the tiled layout for bf16 x all the same."""
    from lowrank.ops import _dispatch

    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 16)  # the decisions the probe takes first, pinned
    monkeypatch.setattr(_runtime, "NF4_CPU_BF16_DOT", False)
    real = _C.nf4_tiled_available
    monkeypatch.setattr(_C, "nf4_tiled_available", lambda d: False if d == _C.DType.bfloat16 else real(d))
    monkeypatch.setattr(_dispatch, "_compared_ms", lambda calls: {"tiled": 1.0, "rows": 2.0, "sets": 2})
    value, _ = _dispatch._probe_nf4_tiled(torch.bfloat16)
    assert value == [1, 256, 256]
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", tuple(value))
    layer = lowrank.NF4Linear.from_linear(torch.nn.Linear(128, 40), compute_dtype=torch.bfloat16).eval()
    x = torch.randn(3, 128).bfloat16()
    with torch.no_grad():
        y = layer(x)
    tw = layer._frozen.tiled[1]
    assert torch.equal(y, tiled_call(x.float(), tw, layer.bias, None, None, torch.bfloat16, scale=1.0))
