"""Mixed-adapter batches: the op against a float64 reference (odd shapes, ranks 1..64, empty segments,
one adapter, no adapter), every CPU variant, both paths, the C++ entry point's refusals, opcheck,
gradcheck, torch.compile, and whole models (Llama, GPT-2, QLoRA) against running each row alone."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lowrank
from lowrank import _C
from lowrank._validate import matrix
from lowrank.ops import _runtime
from lowrank.ops import mixed as mx

from conftest import absolute, assert_error_within, device_dtype_params, fp64, took_native_16bit_gemm


def _adapters(k, n, ranks, dtype, device, *, vera=False, adapter_dtype=None):
    ad = adapter_dtype or dtype
    a = [torch.randn(r, k, dtype=ad, device=device) / k**0.5 for r in ranks]
    b = [torch.randn(n, r, dtype=ad, device=device) for r in ranks]
    d = [torch.rand(r, device=device) + 0.5 if vera else None for r in ranks]
    c = [torch.randn(n, device=device) if vera else None for r in ranks]
    s = [0.5 + 0.25 * i for i in range(len(ranks))]
    return a, b, d, c, s


def _args(m, k, n, ranks, dtype, device="cpu", *, ids=None, weight=True, bias=True, base=False, dropout=False,
          vera=False, adapter_dtype=None):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5 if weight else None
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    c = torch.randn(m, n, device=device) if base else None
    if ids is None:
        ids = torch.randint(-1, len(ranks), (m,))
    order, offsets = mx.plan_rows(ids, len(ranks))
    xa = torch.randn(m, k, dtype=dtype, device=device) if dropout else None
    a, bb, d, cs, s = _adapters(k, n, ranks, dtype, device, vera=vera, adapter_dtype=adapter_dtype)
    return (x, w, b, c, order.to(device), offsets.to(device), a, bb, d, cs, s, xa)


def _map(args, fn):
    out = []
    for t in args:
        if isinstance(t, torch.Tensor):
            out.append(fn(t) if t.is_floating_point() else t)
        elif isinstance(t, list) and t and not isinstance(t[0], float):
            out.append([None if u is None else fn(u) for u in t])
        else:
            out.append(t)
    return tuple(out)


def _check(args, **kw):
    y, h = mx._forward_native(*args)
    exact, h_exact = mx.mixed_linear_forward_reference(*_map(args, fp64))
    same, _ = mx.mixed_linear_forward_reference(*args)
    magnitude, _ = mx.mixed_linear_forward_reference(*_map(args, absolute))
    x, w = args[0], args[1]
    assert_error_within("y", y, same, exact, magnitude, extra_roundings=int(took_native_16bit_gemm(x, w)), **kw)
    assert h.shape == h_exact.shape
    torch.testing.assert_close(h.double(), h_exact.double(), rtol=1e-2 if x.dtype != torch.float32 else 1e-5, atol=1e-3)


SHAPES = [(1, 5, 3), (3, 64, 64), (8, 77, 129), (37, 64, 33), (130, 33, 70)]


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_float64(m, k, n, dtype, path, force_path):
    force_path(path)
    _check(_args(m, k, n, [1, 7, 16, 3], dtype))


@pytest.mark.parametrize(
    "variant",
    ["vera", "base_out", "base_out_and_weight", "dropout", "no_bias", "fp32_adapters", "ranks_to_64"],
)
@pytest.mark.parametrize("m", [11, 150], ids=["short-segments", "long-segments"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_variants(variant, path, m, force_path):
    force_path(path)
    kw, ranks, dtype = {}, [2, 5, 9], torch.float32
    if variant == "vera":
        kw["vera"] = True
    elif variant == "base_out":
        kw.update(weight=False, base=True)
    elif variant == "base_out_and_weight":
        kw["base"] = True
    elif variant == "dropout":
        kw["dropout"] = True
    elif variant == "no_bias":
        kw["bias"] = False
    elif variant == "fp32_adapters":
        dtype, kw["adapter_dtype"] = torch.bfloat16, torch.float32
    elif variant == "ranks_to_64":
        ranks = [1, 2, 4, 8, 16, 32, 64, 63]
    _check(_args(m, 70, 45, ranks, dtype, **kw))


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param(lambda m: torch.zeros(m, dtype=torch.int64), id="all-one-adapter"),
        pytest.param(lambda m: torch.full((m,), -1, dtype=torch.int64), id="all-base"),
        pytest.param(lambda m: torch.full((m,), 2, dtype=torch.int64), id="others-missing"),
        pytest.param(lambda m: torch.arange(m) % 4 - 1, id="interleaved"),
    ],
)
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_plans(ids, path, force_path):
    force_path(path)
    _check(_args(9, 40, 24, [3, 4, 5], torch.float32, ids=ids(9)))


@pytest.mark.parametrize("path,m", [("fused", 13), ("gemm", 100)])
def test_every_cpu_variant(cpu_isa, path, m, force_path):
    force_path(path)
    for dtype in (torch.float32, torch.bfloat16):
        _check(_args(m, 67, 29, [1, 6, 17], dtype, vera=True))
        _check(_args(m, 67, 29, [1, 6, 17], dtype, weight=False, base=True))


def test_one_row_alone_equals_its_adapter():
    """A mixed batch equals running each row with its own adapter through the single-adapter op."""
    args = _args(6, 48, 40, [4, 8], torch.float32, ids=torch.tensor([0, 1, -1, 1, 0, 0]))
    x, w, b, _, order, offsets, a, bb, _, _, s, _ = args
    y, _ = mx._forward_native(*args)
    for row, i in enumerate([0, 1, -1, 1, 0, 0]):
        if i < 0:
            ref = torch.nn.functional.linear(x[row : row + 1].double(), w.double(), b.double())
        else:
            ref, _ = lowrank.ops.lora_linear_forward_reference(
                x[row : row + 1].double(), w.double(), b.double(), a[i].double(), bb[i].double(), s[i], None
            )
        torch.testing.assert_close(y[row : row + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_plan_rows():
    order, offsets = mx.plan_rows(torch.tensor([1, -1, 0, 1, 0]), 3)
    assert order.tolist() == [2, 4, 0, 3, 1] and offsets.tolist() == [0, 2, 4, 4]
    with pytest.raises(ValueError, match="ids"):
        mx.plan_rows(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="num_adapters"):
        mx.plan_rows(torch.tensor([0]), 0)


def test_empty_batch():
    args = _args(0, 16, 8, [2], torch.float32)
    y, h = mx._forward_native(*args)
    assert y.shape == (0, 8) and h.shape == (0, 2)


# ---- the C++ entry point refuses lying metadata ------------------------------------------------
def _raw(m=4, k=8, n=6, r=3):
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    a, b = torch.randn(r, k), torch.randn(n, r)
    table = _C.MixedAdapters([matrix("a", a)], [matrix("b", b)], [None], [None], [1.0])
    order = torch.arange(m, dtype=torch.int32)
    offsets = torch.tensor([0, 2], dtype=torch.int32)
    return dict(out=out, x=x, a=a, b=b, table=table, order=order, offsets=offsets)


def _call(d, order=None, offsets=None, h=None):
    order = d["order"] if order is None else order
    offsets = d["offsets"] if offsets is None else offsets
    _C.mixed_rows_cpu(
        matrix("out", d["out"]), matrix("x", d["x"]), None, None, None, None, matrix("order", order),
        matrix("offsets", offsets), None if h is None else matrix("h", h), d["table"], 1,
    )


@pytest.mark.parametrize(
    "order,offsets,match",
    [
        ([0, 1, 1, 3], [0, 2], "appears twice"),
        ([0, 1, 2, 4], [0, 2], "outside"),
        ([0, 1, 2, -1], [0, 2], "outside"),
        ([0, 1, 2, 3], [1, 2], r"offsets\[0\]"),
        ([0, 1, 2, 3], [0, 5], "non-decreasing"),
        ([0, 1, 2, 3], [0, 2, 3], "offsets: expected shape"),
        ([0, 1, 2], [0, 2], "order: expected shape"),
    ],
)
def test_entry_point_refuses_bad_plans(order, offsets, match):
    d = _raw()
    with pytest.raises(ValueError, match=match):
        _call(d, torch.tensor(order, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32))


def test_entry_point_refuses_bad_shapes():
    d = _raw()
    with pytest.raises(ValueError, match="h: expected 2 rows"):
        _call(d, h=torch.empty(3, 3))
    with pytest.raises(ValueError, match="order: expected int32"):
        _call(d, order=torch.arange(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="x: expected 8 columns"):
        _C.mixed_rows_cpu(matrix("out", d["out"]), matrix("x", torch.randn(4, 9)), None, None, None, None,
                          matrix("order", d["order"]), matrix("offsets", d["offsets"]), None, d["table"], 1)
    with pytest.raises(ValueError, match="e"):
        _C.MixedAdapters([matrix("a", torch.randn(3, 8))], [matrix("b", torch.randn(6, 4))], [None], [None], [1.0])
    with pytest.raises(ValueError, match="one entry per adapter"):
        _C.MixedAdapters([matrix("a", torch.randn(3, 8))], [], [None], [None], [1.0])
    half = _C.MixedAdapters([matrix("a", torch.randn(3, 8).half())], [matrix("b", torch.randn(6, 3).half())], [None],
                            [None], [1.0])
    with pytest.raises(ValueError, match="float16 factors run on CUDA only"):
        d["table"] = half
        _call(d)


def test_op_argument_errors():
    args = list(_args(4, 8, 6, [2, 3], torch.float32))
    bad = list(args)
    bad[7] = bad[7][:1]
    with pytest.raises(ValueError, match="lora_b: expected one entry per adapter"):
        mx._forward_native(*bad)
    bad = list(args)
    bad[6] = [args[6][0], torch.randn(3, 9)]
    with pytest.raises(ValueError, match=r"lora_a\[1\]"):
        mx._forward_native(*bad)
    bad = list(args)
    bad[4] = args[4].long()
    with pytest.raises(TypeError, match="order"):
        mx._forward_native(*bad)


# ---- autograd, opcheck, compile -----------------------------------------------------------------
def test_gradcheck():
    args = _map(_args(5, 6, 4, [2, 3], torch.float64, vera=True, base=True, dropout=True), lambda t: t.double())
    x, w, b, c, order, offsets, a, bb, d, cs, s, xa = args
    flat = [t.requires_grad_() for t in (x, w, b, c, xa, *a, *bb, *d, *cs)]

    def f(x, w, b, c, xa, a0, a1, b0, b1, d0, d1, c0, c1):
        return torch.ops.lowrank.mixed_linear_forward(
            x, w, b, c, order, offsets, [a0, a1], [b0, b1], [d0, d1], [c0, c1], s, xa
        )[0]

    assert torch.autograd.gradcheck(f, tuple(flat))


def test_opcheck():
    args = _args(6, 16, 12, [2, 4], torch.float32, vera=True)
    torch.library.opcheck(torch.ops.lowrank.mixed_linear_forward.default, args)
    grad_args = _map(args, lambda t: t.clone().requires_grad_())
    torch.library.opcheck(torch.ops.lowrank.mixed_linear_forward.default, grad_args)


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_gradients_per_adapter_match_plain(path, force_path):
    """Each adapter gets the gradient of its own rows: the kernels' gradients equal plain torch on
    each row's own adapter, summed."""
    force_path(path)
    ids = torch.tensor([0, 1, -1, 1, 0, 1, 1])
    args = _args(7, 24, 20, [3, 5], torch.float32, ids=ids)
    args = _map(args, lambda t: t.clone().requires_grad_())
    y = torch.ops.lowrank.mixed_linear_forward(*args)[0]
    g = torch.randn_like(y)
    y.backward(g)
    x, w, b, _, _, _, a, bb, _, _, s, _ = args
    plain = [_map((x, w, b, a, bb), lambda t: t.detach().double().requires_grad_())]
    x2, w2, b2, a2, bb2 = plain[0]
    rows = []
    for row, i in enumerate(ids.tolist()):
        yr = torch.nn.functional.linear(x2[row], w2, b2)
        if i >= 0:
            yr = yr + s[i] * (bb2[i] @ (a2[i] @ x2[row]))
        rows.append(yr)
    torch.stack(rows).backward(g.double())
    for got, want in [(x, x2), (w, w2), (b, b2), *zip(a, a2), *zip(bb, bb2)]:
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile():
    args = _args(5, 16, 12, [2, 4], torch.float32)

    def f(*a):
        return torch.ops.lowrank.mixed_linear_forward(*a)[0] * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, f(*args))


# ---- whole models -------------------------------------------------------------------------------
def _llama(vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(vocab=97):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _randomize_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lambda" in name:
                p.normal_(0, 0.3)


def _per_row(model, ids, names, fn):
    outs = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lowrank.disable_adapters(model):
                outs.append(fn(ids[i : i + 1]))
        else:
            lowrank.set_adapter(model, name)
            outs.append(fn(ids[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_logits_and_generate(arch, dtype):
    model = _gpt2() if arch == "gpt2" else _llama()
    if arch == "qlora":
        lowrank.inject(model, lowrank.QLoRAConfig(r=4, alpha=8, target_modules="all-linear"), "a")
        lowrank.inject(model, lowrank.LoRAConfig(r=8, alpha=4, target_modules=["q_proj", "v_proj"]), "b")
        lowrank.inject(model, lowrank.LoRAConfig(r=2, alpha=2, target_modules=["down_proj"]), "c")
    else:
        lowrank.inject(model, lowrank.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "a")
        lowrank.inject(model, lowrank.LoRAConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True), "b")
        lowrank.inject(model, lowrank.VeRAConfig(r=16, target_modules="all-linear"), "c")
    model.to(dtype)
    _randomize_adapters(model)
    names = ["a", "__base__", "b", "c", "a", "c"]
    ids = torch.randint(1, 97, (len(names), 9))
    with torch.no_grad():
        with lowrank.mixed_batch(model, names):
            got = model(ids).logits
        want = _per_row(model, ids, names, lambda t: model(t).logits)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        torch.testing.assert_close(got.float(), want.float(), **tol)
        if dtype == torch.float32:
            with lowrank.mixed_batch(model, names):
                out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            ref = _per_row(model, ids, names, lambda t: model.generate(t, max_new_tokens=6, do_sample=False, pad_token_id=0))
            assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["llama", "qlora"])
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_model_under_autocast(arch, path, force_path, monkeypatch):
    """An fp32 model's mixed batch under autocast: bf16 logits, each row its own adapter's (as autocast
    computes that adapter alone), and gradients from a step inside autocast as far from the fp32 ones as
    autocast's own (each adapter alone under autocast) are. The path is pinned for the batch and for each
    row alone (NF4's too): where a measured crossover fell between a row's tokens and the batch's, the
    rows alone took the fused kernels (fp32 sums, one rounding) and the batch bf16 GEMMs, 4.8x farther."""
    force_path(path)
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30 if path == "fused" else -1)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", 1 << 30 if path == "fused" else -1)
    model = _llama()
    lowrank.inject(model, (lowrank.QLoRAConfig if arch == "qlora" else lowrank.LoRAConfig)(r=4, alpha=8), "a")
    lowrank.inject(model, lowrank.LoRAConfig(r=6, alpha=6, target_modules=["q_proj", "v_proj"]), "b")
    _randomize_adapters(model)
    names = ["a", "__base__", "b", "a"]
    ids = torch.randint(1, 97, (len(names), 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lowrank.mixed_batch(model, names):
            got = model(ids).logits
        want = _per_row(model, ids, names, lambda t: model(t).logits)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)

    def grads(autocast: bool, mixed: bool) -> dict:
        """The adapters' gradients of the batch's mean loss: in one mixed batch, or row by row (each row's
        mean loss over the number of rows: the rows are equally long)."""
        model.train().zero_grad()
        rows = [(ids, None)] if mixed else [(ids[i : i + 1], n) for i, n in enumerate(names) if n != "__base__"]
        for t, name in rows:
            if name is not None:
                lowrank.set_adapter(model, name)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with lowrank.mixed_batch(model, names) if mixed else contextlib.nullcontext():
                    loss = model(t, labels=t).loss * (t.shape[0] / len(names))
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed, alone, exact = grads(True, True), grads(True, False), grads(False, False)
    assert set(mixed) == set(alone) == set(exact) and len(mixed) > 0

    def distance(got: dict) -> float:  # over every adapter gradient at once: one parameter alone may be lucky
        return sum(float((got[n] - exact[n]).norm() ** 2) for n in exact) ** 0.5

    # bf16 noise, as far from fp32 as autocast's own with each adapter alone: within 2x over dense bases (a
    # Zen 4 read 0.75-1.27x over 15 seeds on either path), 3x over a 4-bit base, whose output the mixed
    # path rounds to bf16 before the adapters' terms join it, one rounding more than QLoRA alone (0.61-2.25x).
    # And no parameter off by a quarter of its norm: a row on the wrong adapter, or a term missing, errs
    # by the gradient's own size.
    limit = 3 if arch == "qlora" else 2
    assert distance(mixed) <= limit * distance(alone), (distance(mixed), distance(alone))
    for n, g in mixed.items():
        assert g.dtype == torch.float32 and (g - exact[n]).norm() <= 0.25 * exact[n].norm(), n


def test_model_training_gradients():
    model = _llama()
    lowrank.inject(model, lowrank.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "a")
    lowrank.inject(model, lowrank.LoRAConfig(r=6, alpha=6, target_modules="all-linear"), "b")
    _randomize_adapters(model)
    model.train()
    names = ["a", "b", "a", "__base__"]
    ids = torch.randint(1, 97, (4, 8))
    with lowrank.mixed_batch(model, names):
        model(ids, labels=ids).logits.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(names):
        if name == "__base__":
            continue
        lowrank.set_adapter(model, name)
        model(ids[i : i + 1]).logits.sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 0
    for n in got:  # fp32 sums in another order: relative to the gradient's scale
        err = (got[n] - want[n]).abs().max().item()
        assert err <= 1e-5 * want[n].abs().max().item() + 1e-7, (n, err)


def test_modules_to_save():
    model = _llama()
    lowrank.inject(model, lowrank.LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    lowrank.inject(model, lowrank.LoRAConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]), "b")
    _randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "copies" in name:
                p.normal_(0, 0.1)
        names = ["b", "a", "__base__"]
        ids = torch.randint(1, 97, (3, 5))
        with lowrank.mixed_batch(model, names):
            got = model(ids).logits
        want = _per_row(model, ids, names, lambda t: model(t).logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_model_errors():
    model = _llama()
    lowrank.inject(model, lowrank.LoRAConfig(r=4, target_modules="all-linear"), "a")
    lowrank.inject(model, lowrank.FullConfig(target_modules=["q_proj"]), "full")
    ids = torch.randint(1, 97, (2, 4))
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: no adapter named 'nope'"):
        with lowrank.mixed_batch(model, ["a", "nope"]):
            pass
    with pytest.raises(TypeError, match="adapter_names"):
        with lowrank.mixed_batch(model, "a"):
            pass
    with pytest.raises(TypeError, match="'full'"):
        with lowrank.mixed_batch(model, ["a", "full"]):
            pass
    with pytest.raises(ValueError, match="3 adapter names"):
        with lowrank.mixed_batch(model, ["a", "a", "__base__"]):
            model(ids)
    lowrank.merge(model, "a")
    with pytest.raises(RuntimeError, match="merged"):
        with lowrank.mixed_batch(model, ["a", "__base__"]):
            pass
    lowrank.unmerge(model, "a")
    with lowrank.mixed_batch(model, ["a", "__base__"]):  # the block leaves nothing behind
        pass
    assert all(m._mixed is None for m in model.modules() if hasattr(m, "_mixed"))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_devices(device, dtype):
    """Fused and GEMM sizes on every device and native dtype (CUDA cases skip without a GPU)."""
    for m in (1, 8, 300):
        _check(_args(m, 96, 80, [4, 16, 1], dtype, device, vera=True))
