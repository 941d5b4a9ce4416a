"""lowrank.NF4Linear and lowrank.QLoRALinear: construction, bitsandbytes-compatible state dicts,
memory, LoRA semantics on a 4-bit base, merging, training and torch.compile."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import lowrank

try:
    import bitsandbytes as bnb
except Exception:
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

BNB_KEYS = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"}  # fmt: skip


def _close_to_dense(y, x, w_dq, bias):
    ref = x.double() @ w_dq.double().t() + (0 if bias is None else bias.double())
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale + 1e-6


# ---------------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 40), (100, 33), (256, 512)], ids=str)
def test_from_linear_forward(shape, bias):
    k, n = shape
    lin = nn.Linear(k, n, bias=bias)
    layer = lowrank.NF4Linear.from_linear(lin)
    w_dq = layer.dequantize(torch.float32)
    assert w_dq.shape == (n, k)
    # the quantization error itself is bounded (NF4 of a uniform init)
    assert (w_dq - lin.weight).abs().max() <= 0.153 * lin.weight.abs().max() + 1e-6  # half the widest code gap (-1 .. -0.696)
    for lead in [(1,), (5,), (2, 3)]:
        x = torch.randn(*lead, k)
        _close_to_dense(layer(x), x, w_dq, layer.bias)


def test_default_constructor_and_repr():
    layer = lowrank.NF4Linear(96, 20, blocksize=32, double_quant=False)
    assert layer.weight.dtype == torch.uint8 and layer.weight_absmax.dtype == torch.float32
    assert not layer.double_quant and "blocksize=32" in repr(layer)
    assert layer(torch.randn(4, 96)).shape == (4, 20)


def test_frozen_and_no_dense_copy():
    lin = nn.Linear(128, 64)
    layer = lowrank.NF4Linear.from_linear(lin)
    assert not any(p.requires_grad for p in layer.parameters())
    big = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.dtype.is_floating_point and t.numel() >= 128 * 64]
    assert big == []


def test_bits_per_parameter():
    layer = lowrank.NF4Linear(4096, 4096, bias=False)
    bits = 8 * layer.nbytes() / (4096 * 4096)
    assert bits <= 4.127 + 1e-3, bits
    plain = lowrank.NF4Linear(4096, 512, bias=False, double_quant=False)
    assert abs(8 * plain.nbytes() / (4096 * 512) - 4.5) < 1e-3


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float32])
def test_compute_dtype(compute_dtype):
    lin = nn.Linear(64, 32)
    layer = lowrank.NF4Linear.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype, as bitsandbytes does
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    # the product runs in the compute dtype: the same as casting the input there first
    run = compute_dtype or torch.float32
    assert torch.equal(y, layer(x.to(run)).float())
    if compute_dtype == torch.bfloat16:
        assert not torch.equal(y, lowrank.NF4Linear.from_linear(lin)(x))  # not silently fp32


def test_to_dtype_keeps_the_format():
    layer = lowrank.NF4Linear(128, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)
    after = layer.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert layer.bias.dtype == torch.bfloat16


def test_state_dict_keys_and_round_trip():
    lin = nn.Linear(100, 48)
    layer = lowrank.NF4Linear.from_linear(lin)
    sd = layer.state_dict()
    assert set(sd) == BNB_KEYS
    info = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert info["quant_type"] == "nf4" and info["blocksize"] == 64 and info["shape"] == [48, 100]
    # through a byte stream, loading tensors only (weights_only)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = lowrank.NF4Linear(100, 48, blocksize=128, double_quant=False)
    fresh.load_state_dict(loaded)
    assert fresh.blocksize == 64 and fresh.double_quant
    x = torch.randn(6, 100)
    assert torch.equal(fresh(x), layer(x))


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = lowrank.NF4Linear(64, 24)
    save_file(layer.state_dict(), tmp_path / "w.safetensors")
    fresh = lowrank.NF4Linear(64, 24)
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_dense_state_dict_loads_by_quantizing():
    lin = nn.Linear(64, 16)
    layer = lowrank.NF4Linear(64, 16)
    layer.load_state_dict(lin.state_dict())
    ref = lowrank.NF4Linear.from_linear(lin)
    assert torch.equal(layer.dequantize(), ref.dequantize())


def test_bad_state_dicts():
    layer = lowrank.NF4Linear(64, 16)
    sd = layer.state_dict()
    other = lowrank.NF4Linear(64, 8).state_dict()
    with pytest.raises(RuntimeError, match="expected shape"):
        layer.load_state_dict(other)
    bad = dict(sd)
    bad["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps({"quant_type": "fp4", "blocksize": 64, "shape": [16, 64], "dtype": "float32"}).encode()), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="fp4"):
        layer.load_state_dict(bad)
    bad = dict(sd)
    bad["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        layer.load_state_dict(bad)
    with pytest.raises(TypeError, match="linear"):
        lowrank.NF4Linear.from_linear(torch.nn.Conv1d(2, 2, 1))


@needs_bnb
@pytest.mark.parametrize("shape", [(128, 40), (4096, 64)], ids=str)
def test_bitsandbytes_state_dict_loads(shape):
    k, n = shape
    lin = nn.Linear(k, n)
    l4 = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")  # quantizes
    sd = l4.state_dict()
    layer = lowrank.NF4Linear(k, n)
    layer.load_state_dict(sd)
    x = torch.randn(5, k)
    with torch.no_grad():
        ours, theirs = layer(x), l4(x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # ... and the quantized bytes are the ones we would have written
    mine = lowrank.NF4Linear.from_linear(lin).state_dict()
    for key in BNB_KEYS - {"weight.quant_state.bitsandbytes__nf4"}:
        assert torch.equal(mine[key], sd[key].reshape(mine[key].shape)), key


@needs_bnb
def test_our_state_dict_loads_into_bitsandbytes():
    lin = nn.Linear(128, 40)
    layer = lowrank.NF4Linear.from_linear(lin)
    sd = layer.state_dict()
    l4 = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    # bitsandbytes' own way to adopt a pre-quantized checkpoint (what transformers calls)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    l4.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    l4.bias = nn.Parameter(sd["bias"])
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(l4(x), layer(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# QLoRALinear
# ---------------------------------------------------------------------------------------------
def test_fresh_adapter_is_identity():
    lin = nn.Linear(96, 40)
    q = lowrank.QLoRALinear.from_linear(lin, r=4, alpha=8)
    base = lowrank.NF4Linear.from_linear(lin)
    x = torch.randn(7, 96)
    assert torch.equal(q(x), base(x))
    assert q.lora_A.weight.shape == (4, 96) and q.lora_B.weight.shape == (40, 4)
    assert bool((q.lora_B.weight == 0).all()) and q.scaling == 2.0
    keys = set(q.state_dict())
    assert keys == BNB_KEYS | {"lora_A.weight", "lora_B.weight"}


def test_adapter_options_validated():
    lin = nn.Linear(32, 8)
    with pytest.raises(ValueError, match="r:"):
        lowrank.QLoRALinear.from_linear(lin, r=0)
    with pytest.raises(ValueError, match="dropout"):
        lowrank.QLoRALinear.from_linear(lin, dropout=1.5)
    q = lowrank.QLoRALinear.from_linear(lin, r=4, alpha=8, use_rslora=True)
    assert q.scaling == 4.0


def test_forward_with_adapter_matches_dense_lora():
    lin = nn.Linear(128, 48)
    q = lowrank.QLoRALinear.from_linear(lin, r=8, alpha=16)
    nn.init.normal_(q.lora_B.weight, std=0.1)
    x = torch.randn(2, 9, 128)
    w = q.dequantize(torch.float32).double() + q.delta_weight().double()
    ref = x.double() @ w.t() + q.bias.double()
    y = q(x)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_training_step_updates_only_the_adapter():
    lin = nn.Linear(64, 32)
    q = lowrank.QLoRALinear.from_linear(lin, r=4, dropout=0.1)
    assert {n for n, p in q.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    codes = q.weight.clone()
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    losses = []
    for _ in range(20):
        loss = ((q(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(q.weight, codes)


def test_backward_saves_no_dense_weight():
    n, k = 96, 128
    q = lowrank.QLoRALinear.from_linear(nn.Linear(k, n), r=4)
    x = torch.randn(3, k, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved and all(not (t.dtype.is_floating_point and t.numel() >= n * k) for t in saved)


def test_merge_is_lossy_and_says_so():
    lin = nn.Linear(128, 64)
    q = lowrank.QLoRALinear.from_linear(lin, r=8, alpha=16)
    nn.init.normal_(q.lora_B.weight, std=0.05)
    x = torch.randn(4, 128)
    before = q(x)
    codes = q.weight.clone()
    with pytest.warns(UserWarning, match="lossy"):
        report = q.merge()
    assert report["mean_abs_error"] > 0 and report["max_abs_error"] >= report["mean_abs_error"]
    assert q.merged and not torch.equal(q.weight, codes)
    after = q(x)
    assert (after - before).abs().max() < 0.2 * before.abs().max()
    with pytest.raises(RuntimeError, match="already merged"):
        q.merge()
    q.unmerge()
    assert torch.equal(q.weight, codes) and torch.equal(q(x), before)
    with pytest.raises(RuntimeError, match="not merged"):
        q.unmerge()


def test_merged_linear_is_exact():
    lin = nn.Linear(64, 32)
    q = lowrank.QLoRALinear.from_linear(lin, r=4)
    nn.init.normal_(q.lora_B.weight, std=0.05)
    dense = q.merged_linear()
    assert isinstance(dense, nn.Linear)
    x = torch.randn(5, 64)
    assert torch.allclose(dense(x), q(x), rtol=1e-5, atol=1e-6)


def test_nf4_state_dict_loads_into_qlora():
    base = lowrank.NF4Linear(64, 16)
    q = lowrank.QLoRALinear(64, 16, r=4)
    q.load_state_dict(base.state_dict())  # no adapter keys: the fresh adapter stays
    x = torch.randn(2, 64)
    assert torch.equal(q(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile_fullgraph(dtype):
    q = lowrank.QLoRALinear.from_linear(nn.Linear(64, 24), r=4, compute_dtype=dtype)
    nn.init.normal_(q.lora_B.weight, std=0.1)
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.float().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_eager = q(x)
    y_eager.float().sum().backward()
    assert torch.allclose(y.float(), y_eager.float()) and torch.allclose(gx.float(), x.grad.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_views_give_the_op_bits_and_follow_the_weight(dtype, monkeypatch):
    """Inference reuses the layer's packed-weight kernel view (ops/nf4.py forward_fast): the same bits
    as the registered op on the same tensors, and a re-quantized weight (new codes and scales), a
    new bias or a changed adapter is what the next call reads."""
    from lowrank.ops import _runtime

    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30)
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (0, 0, 0))  # the op's kernels (the tiled layout: test_nf4_tiled.py)
    torch.manual_seed(0)
    dense = nn.Linear(128, 40).to(dtype)
    for layer in (lowrank.NF4Linear.from_linear(dense), lowrank.QLoRALinear.from_linear(dense, r=4)):
        layer.eval()
        if isinstance(layer, lowrank.QLoRALinear):
            with torch.no_grad():
                layer.lora_B.weight.normal_()
        x = torch.randn(3, 128).to(dtype)

        def op(lay):
            a = getattr(lay, "lora_A", None)
            la, lb, s = (a.weight, lay.lora_B.weight, lay.scaling) if a is not None else (None, None, 1.0)
            return torch.ops.lowrank.nf4_linear_forward(x, *lay.weight_args(), lay.bias, la, lb, s, None)[0]

        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(layer(x), op(layer))
            replacement = lowrank.NF4Linear.from_linear(nn.Linear(128, 40).to(dtype))
            for name in ("weight", "weight_absmax", "weight_absmax2", "weight_code2", "weight_offset"):
                setattr(layer, name, getattr(replacement, name))
            layer.bias.data = torch.randn(40).to(dtype)
            assert torch.equal(layer(x), op(layer))
            if isinstance(layer, lowrank.QLoRALinear):
                layer.lora_B.weight.data = torch.randn(40, 4).to(layer.lora_B.weight.dtype)
                assert torch.equal(layer(x), op(layer))


def test_load_state_dict_copies_unless_assign():
    """As torch's modules: a layer loaded from another's state dict holds its own copy of the codes and
    scales (the other's later in-place writes do not reach it); with ``assign=True`` it takes the
    state dict's tensors themselves."""
    torch.manual_seed(0)
    source = lowrank.NF4Linear.from_linear(nn.Linear(128, 40))
    x = torch.randn(3, 128)
    for assign in (False, True):
        layer = lowrank.NF4Linear.from_linear(nn.Linear(128, 40)).eval()
        state = source.state_dict()
        layer.load_state_dict(state, assign=assign)
        with torch.no_grad():
            before = layer(x)
            assert torch.equal(before, source.eval()(x))
        keys = {"weight": "weight", "weight_absmax": "weight.absmax", "weight_absmax2": "weight.nested_absmax",
                "weight_code2": "weight.nested_quant_map"}  # buffer -> its state-dict key  # fmt: skip
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        shared = [ptr(layer._buffers[buf]) == ptr(state[key]) for buf, key in keys.items()]
        assert shared == [assign] * len(keys), (assign, shared)
        if not assign:
            with torch.no_grad():
                source.weight.bitwise_xor_(0x11)  # the source's codes change in place
                assert torch.equal(layer(x), before)
                source.weight.bitwise_xor_(0x11)
