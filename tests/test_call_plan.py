"""The per-layer inference plan (ops/lora.py CallPlan, _C.RowsPlan) and the per-call thread limit
(_C.set_parallel_min_work, the ``cpu_parallel_min_work`` decision).

After one full-path inference call a layer keeps a plan; later calls that fit it run the same kernel on
the same views through one C++ call. It must give the full path's bits, and must never be used where
the full path would do something else: another tensor (pointer, shape, strides, dtype; for the tiled
NF4 copy new values written in place), another x (dtype, width, strides, token count outside the
measured range), another measured choice (a pin or a decision changed), another thread count or scale.
The thread limit must not change a kernel's bits: the rows kernels own whole outputs, and the input
gradients' partial sums follow their task count, not their thread count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from lowrank import _C
from lowrank.ops import _dispatch, _runtime
from lowrank.ops import lora as lora_ops
from lowrank.ops import nf4 as nf4_ops

from conftest import dtype_name

DTYPES = [torch.float32, torch.bfloat16]


def _lora(k=40, n=24, r=3, dtype=torch.float32):
    torch.manual_seed(0)
    layer = lowrank.LoRALinear(k, n, r=r, alpha=6, dtype=dtype).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _lora_op(layer, x):
    return torch.ops.lowrank.lora_linear_forward(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight,
                                                 layer.scaling, None)[0]  # fmt: skip


def _nf4(cls, k=128, n=40, dtype=torch.float32):
    torch.manual_seed(0)
    dense = nn.Linear(k, n).to(dtype)
    layer = (cls.from_linear(dense, r=4) if cls is lowrank.QLoRALinear else cls.from_linear(dense)).eval()
    if cls is lowrank.QLoRALinear:
        with torch.no_grad():
            layer.lora_B.weight.normal_()
    return layer


def _nf4_op(layer, x):
    a = getattr(layer, "lora_A", None)
    la, lb, s = (a.weight, layer.lora_B.weight, layer.scaling) if a is not None else (None, None, 1.0)
    return torch.ops.lowrank.nf4_linear_forward(x, *layer.weight_args(), layer.bias, la, lb, s, None)[0]


@pytest.fixture
def full_path_calls(monkeypatch):
    """How many inference calls took the full path (the views' lookup, which the plan skips), LoRA and
    NF4 alike."""
    calls = []
    original = lora_ops.FrozenOperands.lookup

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(lora_ops.FrozenOperands, "lookup", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# The plan gives the full path's bits, and is what later calls use
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)], ids=str)
def test_lora_plan_gives_the_op_bits(dtype, lead, force_path, full_path_calls):
    force_path("fused")
    layer = _lora(dtype=dtype)
    x = torch.randn(*lead, 40).to(dtype)
    with torch.no_grad():
        want = _lora_op(layer, x)
        first = layer(x)
        plan = layer._frozen.plan
        assert plan is not None and len(full_path_calls) == 1
        for _ in range(3):
            got = layer(x)
            assert torch.equal(got, want) and got.shape == want.shape and got.dtype == dtype
        assert torch.equal(first, want)
    assert layer._frozen.plan is plan and len(full_path_calls) == 1  # the later calls went through the plan


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("cls", [lowrank.NF4Linear, lowrank.QLoRALinear], ids=lambda c: c.__name__)
@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "rows"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_nf4_plan_gives_the_full_path_bits(dtype, cls, tiled, m, monkeypatch, full_path_calls):
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30)
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 1) if tiled else (0, 0, 0))
    if tiled and not nf4_ops.TiledWeight.supported((40, 128), 64, dtype if m > 1 else torch.float32):
        pytest.skip("this CPU kernel variant has no tiled kernel")
    layer = _nf4(cls, dtype=dtype)
    x = torch.randn(m, 128).to(dtype)
    with torch.no_grad():
        first = layer(x)
        plan = layer._frozen.plan
        assert plan is not None and plan.mode[0] == ("tiled" if tiled else "rows")
        for _ in range(3):
            assert torch.equal(layer(x), first)
        if not tiled:  # the row kernels are the registered op's (the tiled layout sums in another order)
            assert torch.equal(first, _nf4_op(layer, x))
        exact = _nf4_op(layer, x).double()  # either way within the contract's rounding of the op's result
        assert torch.allclose(first.double(), exact, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert layer._frozen.plan is plan and len(full_path_calls) == 1


# ---------------------------------------------------------------------------------------------
# ... and is never used where the full path would do something else
# ---------------------------------------------------------------------------------------------
def test_lora_plan_follows_every_change(force_path, monkeypatch):
    force_path("fused")
    layer = _lora(k=32, n=32)
    x = torch.randn(3, 32)

    def check(inp=x):
        with torch.no_grad():
            got, want = layer(inp), _lora_op(layer, inp)
        assert torch.equal(got, want)

    check()
    check()  # planned
    with torch.no_grad():
        layer.lora_B.weight.mul_(3)  # values in place: the plan's views read them
    check()
    layer.weight.data = layer.weight.data.t()  # same pointer, transposed strides: not the plan's weight
    check()
    layer.weight.data = torch.randn(32, 32)  # new storage
    check()
    layer.lora_A.weight = nn.Parameter(torch.randn(3, 32))  # a new Parameter
    check()
    layer.scaling = 0.5  # another scale
    check()
    check(torch.randn(2, 40)[:, 3:35])  # strided rows: the full path copies them
    check(torch.randn(5, 32))  # another token count
    check(x.bfloat16().float())
    layer.bias = None
    check()
    force_path("gemm")  # a pinned choice: the GEMM path, not the plan's fused kernel
    check()
    force_path("fused")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count
        check()
    finally:
        torch.set_num_threads(threads)
    check()
    with pytest.raises(TypeError, match="^x: expected dtype float32, got bfloat16|^weight: expected dtype"):
        with torch.no_grad():
            layer(x.bfloat16())  # the op's own error, not the plan's


def test_lora_plan_not_used_where_the_choice_is_the_gemm(force_path, full_path_calls):
    force_path("gemm")
    layer = _lora()
    x = torch.randn(4, 40)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(layer(x), _lora_op(layer, x))
    assert layer._frozen.plan is None


def test_lora_plan_bf16_widening_follows_its_decision(monkeypatch, force_path):
    """A bf16 x read as bf16 (AVX512-BF16 products) or widened, as ``cpu_lora_bf16_rows`` says at the
    call: a plan made under one is not used under the other."""
    force_path("fused")
    layer = _lora(dtype=torch.bfloat16)
    x = torch.randn(3, 40).bfloat16()
    for dot in (True, False, True):
        monkeypatch.setattr(_runtime, "CPU_LORA_BF16_DOT", dot)
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(layer(x), _lora_op(layer, x))
        assert layer._frozen.plan.widen is (not dot)


def test_nf4_tiled_plan_follows_new_values_the_pins_and_the_switch(monkeypatch):
    """The tiled copy is derived data: new codes and scales written in place (same pointers) must remake
    it, so the plan's key holds their version counters; a pin that moves this token count off the tiled
    layout, or ``tiled_inference = False``, leaves the plan's layout for the row kernels."""
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30)
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 0))
    if not nf4_ops.TiledWeight.supported((40, 128), 64, torch.float32):
        pytest.skip("this CPU kernel variant has no tiled kernel")
    layer = _nf4(lowrank.QLoRALinear)
    other = lowrank.NF4Linear.from_linear(nn.Linear(128, 40))  # other codes and scales
    x = torch.randn(2, 128)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before) and layer._frozen.plan.mode[0] == "tiled"
        for name in lowrank.NF4Linear._QUANT_BUFFERS:  # new values in the same buffers
            if layer._buffers[name] is not None:
                layer._buffers[name].copy_(other._buffers[name])
        after = layer(x)
        monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (0, 0, 0))
        rows = layer(x)
        assert layer._frozen.plan.mode[0] == "rows" and torch.equal(rows, _nf4_op(layer, x))
        assert not torch.equal(after, before)
        assert torch.allclose(after, rows, rtol=1e-5, atol=1e-5)  # the new codes, in the tiled order
        monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 0))
        assert torch.equal(layer(x), after) and layer._frozen.plan.mode[0] == "tiled"
        layer.tiled_inference = False
        assert torch.equal(layer(x), rows) and layer._frozen.plan.mode[0] == "rows"
        assert layer._frozen.tiled is None


def test_plans_run_on_torchs_thread_count(force_path):
    """A plan made at one thread count is not run at another (the full path takes the call)."""
    force_path("fused")
    layer = _lora()
    x = torch.randn(2, 40)
    seen = []

    class Spy:
        def __init__(self, rows):
            self.rows = rows

        def run(self, *args):
            seen.append(args[-1])
            return self.rows.run(*args)

    threads = torch.get_num_threads()
    with torch.no_grad():
        layer(x)
        layer._frozen.plan.rows = Spy(layer._frozen.plan.rows)
        layer(x)
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            layer(x)
        finally:
            torch.set_num_threads(threads)
    assert seen == [threads]


# ---------------------------------------------------------------------------------------------
# The thread limit of small calls
# ---------------------------------------------------------------------------------------------
def test_parallel_min_work_is_applied_and_checked(monkeypatch):
    monkeypatch.setattr(_runtime, "PARALLEL_MIN_WORK", 12345)
    _runtime.num_threads()
    assert _C.parallel_min_work() == 12345
    monkeypatch.setattr(_runtime, "PARALLEL_MIN_WORK", 0)
    _runtime.num_threads()
    assert _C.parallel_min_work() == 0
    with pytest.raises(ValueError, match="^work: expected a count of multiply-adds >= 0"):
        _C.set_parallel_min_work(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_thread_limit_keeps_the_bits(dtype, monkeypatch, force_path, adapter_products):
    """Inference (LoRA, NF4 rows and tiled) and a few-token training step give the same bits whether
    every call takes every thread or each runs on one."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to limit")
    force_path("fused")
    adapter_products(True)
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30)

    def run():
        out = []
        for tiled in ((0, 0, 0), (1, 1 << 30, 0)):
            monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", tiled)
            for layer in (_lora(k=256, n=96, dtype=dtype), _nf4(lowrank.QLoRALinear, k=256, n=96, dtype=dtype)):
                x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
                with torch.no_grad():
                    out.append(layer(x))
                layer.train()
                xx = x.clone().requires_grad_(True)
                y = layer(xx)
                out += torch.autograd.grad(y.float().square().sum(), (xx, layer.lora_A.weight, layer.lora_B.weight))
        return out

    monkeypatch.setattr(_runtime, "PARALLEL_MIN_WORK", 0)
    every = run()
    monkeypatch.setattr(_runtime, "PARALLEL_MIN_WORK", 1 << 40)
    one = run()
    assert _C.parallel_min_work() == 1 << 40
    for a, b in zip(every, one, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wins_from, want", [(64, 0), (256, 256 * 256 // 2), (None, 2048 * 2048)])
def test_parallel_probe_reads_the_first_clear_win(monkeypatch, wins_from, want):
    """The decision is s² / threads for the first probed size where all threads beat one by 5 % (0 at
    the smallest, the largest s² where they never do); a tie keeps one thread."""
    sizes = iter(_dispatch.PARALLEL_PROBE_SIZES)

    def compared(calls):
        s = next(sizes)
        one, many = list(calls)
        won = wins_from is not None and s >= wins_from
        return {one: 1.0, many: 0.5 if won else 0.97, "sets": 2}  # 0.97: a tie

    monkeypatch.setattr(_dispatch, "_compared_ms", compared)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        value, timings = _dispatch._probe_parallel_min_work()
        assert value == want and timings
        torch.set_num_threads(1)
        assert _dispatch._probe_parallel_min_work() == (0, {})
    finally:
        torch.set_num_threads(threads)


def test_tiled_copy_is_of_these_very_tensors(monkeypatch):
    """A derived copy must not outlive its tensors: another tensor at the same address, with the same
    shape, strides and version counter (new values written behind torch's back, as a freed tensor's
    memory handed to a new one would hold), is not the tensor the tiled copy was made from."""
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 1 << 30)
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, 1 << 30, 0))
    if not nf4_ops.TiledWeight.supported((40, 128), 64, torch.float32):
        pytest.skip("this CPU kernel variant has no tiled kernel")
    layer = _nf4(lowrank.NF4Linear)
    other = lowrank.NF4Linear.from_linear(nn.Linear(128, 40)).eval()
    names = [n for n in lowrank.NF4Linear._QUANT_BUFFERS if layer._buffers[n] is not None]
    arrays = {n: layer._buffers[n].numpy().copy() for n in names}
    for n in names:
        layer._buffers[n] = torch.from_numpy(arrays[n])
    with torch.no_grad():
        other.bias.copy_(layer.bias)
        x = torch.randn(2, 128)
        before = layer(x)
        assert torch.equal(layer(x), before) and layer._frozen.plan.mode[0] == "tiled"
        for n in names:
            arrays[n][...] = other._buffers[n].numpy()  # no version counter sees this
            layer._buffers[n] = torch.from_numpy(arrays[n])  # same address, shape, strides, version 0
        assert torch.equal(layer(x), other(x))
        layer._frozen.plan = None  # the full path's own check of the copy
        arrays["weight"][...] = 0x77  # other codes again, behind torch's back
        for n in names:
            layer._buffers[n] = torch.from_numpy(arrays[n])
        got = layer(x)
        assert torch.allclose(got, _nf4_op(layer, x), rtol=1e-5, atol=1e-5) and not torch.allclose(got, before)
