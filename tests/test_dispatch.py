"""Code paths chosen by measurement (ops/_dispatch.py): decisions are measured, cached per process
and on disk under a key of what they depend on, shown by lowrank.info(), and every value a decision
can take gives the same numbers (the paths are interchangeable; only their speed differs)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lowrank
from lowrank import _C
from lowrank.ops import _dispatch, _gemm, _runtime


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """This process's decisions forgotten, the disk cache in tmp_path; restored afterwards."""
    saved = dict(_dispatch._decisions)
    _dispatch.reset()
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    yield tmp_path
    _dispatch.reset()
    _dispatch._decisions.update(saved)


def test_decisions_are_measured_and_cached_on_disk(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "disk")
    monkeypatch.setattr(_dispatch, "_steadiness_ms", lambda: 1.0)  # a quiet machine (see the busy test)
    calls = []
    real = _dispatch._PROBES["cpu_bf16_gemm"]
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: calls.append(1) or real())
    value = _dispatch.decide("cpu_bf16_gemm")
    assert value in ("native", "widen") and calls == [1]
    d = _dispatch.report()["cpu_bf16_gemm"]
    assert d["source"] == "measured" and set(next(iter(d["timings_ms"].values()))) == {"native", "widen", "sets"}
    # the same process asks again: no new measurement
    assert _dispatch.decide("cpu_bf16_gemm") == value and calls == [1]
    # a new process (simulated): read from disk, not measured
    _dispatch.reset()
    assert _dispatch.decide("cpu_bf16_gemm") == value and calls == [1]
    assert _dispatch.report()["cpu_bf16_gemm"]["source"] == "disk cache"
    data = json.loads((fresh / "calibration.json").read_text())
    assert list(data) == [_dispatch.cache_key()]
    for part in ("lowrank", "torch", "isa", "threads"):
        assert part in _dispatch.cache_key()


def test_cache_is_keyed_by_threads(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "disk")
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: ("widen", {"probe": 1}))
    _dispatch.decide("cpu_bf16_gemm")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        _dispatch.reset()
        monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: ("native", {"probe": 2}))
        assert _dispatch.decide("cpu_bf16_gemm") == "native"  # another key: measured again
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((fresh / "calibration.json").read_text())) == 2


def test_corrupt_cache_file_is_measured_over(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "disk")
    (fresh / "calibration.json").write_text("{not json")
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: ("widen", {}))
    assert _dispatch.decide("cpu_bf16_gemm") == "widen"
    assert _dispatch.cache_key() in json.loads((fresh / "calibration.json").read_text())


def test_busy_machine_decisions_are_not_cached(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "disk")
    times = iter([1.0] * 5 + [5.0] * 5)  # the steadiness workload got 5x slower meanwhile
    monkeypatch.setattr(_dispatch, "_steadiness_ms", lambda: next(times))
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: ("widen", {}))
    assert _dispatch.decide("cpu_bf16_gemm") == "widen"
    assert "busy" in _dispatch.report()["cpu_bf16_gemm"]["source"]
    assert not (fresh / "calibration.json").exists()


def test_off_and_process_modes(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "off")
    for name, default in _dispatch.DEFAULTS.items():
        assert _dispatch.decide(name) == default
    assert all("off" in d["source"] for d in _dispatch.report().values())
    _dispatch.reset()
    monkeypatch.setenv("LOWRANK_CALIBRATION", "process")
    monkeypatch.setitem(_dispatch._PROBES, "nf4_cpu_input_grad_max_m/float32", lambda: (4, {}))
    assert _dispatch.decide("nf4_cpu_input_grad_max_m/float32") == 4
    assert not (fresh / "calibration.json").exists()
    monkeypatch.setenv("LOWRANK_CALIBRATION", "sometimes")
    _dispatch.reset()
    with pytest.raises(ValueError, match="LOWRANK_CALIBRATION"):
        _dispatch.decide("cpu_bf16_gemm")
    with pytest.raises(KeyError, match="unknown dispatch decision"):
        monkeypatch.setenv("LOWRANK_CALIBRATION", "process")
        _dispatch.decide("nope")


def test_crossover_rule():
    fast, slow = (lambda: None), (lambda: sum(range(20000)))
    # fused wins at every probe: up to the largest probe (nothing beyond it is assumed)
    assert _dispatch._crossover([1, 2], lambda m: fast, lambda m: slow)[0] == 2
    # fused loses at the first probe: nothing runs fused
    assert _dispatch._crossover([1, 2], lambda m: slow, lambda m: fast)[0] == 0
    # fused wins up to 2, loses at 4
    limit, timings = _dispatch._crossover([1, 2, 4], lambda m: fast if m < 4 else slow, lambda m: slow if m < 4 else fast)
    assert limit == 2 and set(timings) == {"1", "2", "4"}


def test_crossover_tie_goes_to_the_fused_path(monkeypatch):
    """Within ``tie`` of the other path's time counts as a win (the fused kernels' probes read weights
    cold, where both paths stream W once); beyond it, a loss."""
    times = {"fused": 1.04, "gemm": 1.0}
    monkeypatch.setattr(_dispatch, "_compared_ms", lambda calls: dict(times, sets=2))
    probe = lambda m: None  # noqa: E731  (never called: _compared_ms is replaced)
    assert _dispatch._crossover([1, 16], probe, probe, tie=0.05)[0] == 16
    assert _dispatch._crossover([1, 16], probe, probe)[0] == 0
    times["fused"] = 1.06
    assert _dispatch._crossover([1, 16], probe, probe, tie=0.05)[0] == 0


def test_one_disturbed_set_does_not_decide(monkeypatch):
    """A burst of other work during one interleaved set (the fused candidate read 3x slow there) is
    outvoted: a second set disagrees, a third is run, and each candidate keeps its quietest median."""
    sets = iter([{"fused": 6.1, "gemm": 2.0}, {"fused": 1.0, "gemm": 1.8}, {"fused": 1.1, "gemm": 1.9}])
    monkeypatch.setattr(_dispatch, "_interleaved_ms", lambda calls: next(sets))
    assert _dispatch._compared_ms({"fused": None, "gemm": None}) == {"fused": 1.0, "gemm": 1.8, "sets": 3}
    # two sets that agree are enough
    sets = iter([{"fused": 1.0, "gemm": 2.0}, {"fused": 1.2, "gemm": 1.9}])
    monkeypatch.setattr(_dispatch, "_interleaved_ms", lambda calls: next(sets))
    limit, timings = _dispatch._crossover([1], lambda m: None, lambda m: None)
    assert limit == 1 and timings == {"1": {"fused": 1.0, "gemm": 1.9, "sets": 2}}


def test_cache_key_names_the_calibration_version():
    """Decisions measured by older probes (which one noisy set could decide) are not reused."""
    assert f"calibration {_dispatch.CALIBRATION_VERSION}" in _dispatch.cache_key()


def test_cache_key_names_the_kernel_sources():
    """Nor decisions measured against other kernels, even in a build of the same version: the key holds
    the build's digest of csrc/ (16 hex digits)."""
    digest = _C.build_info()["source_hash"]
    assert re.fullmatch(r"[0-9a-f]{16}", digest), digest
    assert f"kernels {digest}" in _dispatch.cache_key()


ZEN4 = {"model name": "AMD EPYC", "vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "stepping": "1",
        "cache size": "1024 KB", "flags": "fpu avx2 avx512f avx512_bf16"}  # fmt: skip


def test_cache_key_tells_cpus_with_one_model_name_apart(monkeypatch):
    """Two VMs that both say "AMD EPYC" (a Zen 4 and a Zen 5 did, on this project's machines) keep
    separate decisions: the key holds the family, model, stepping, cache size and a digest of the flags."""
    from lowrank import _info

    keys = []
    for change in ({}, {"cpu family": "26", "model": "2"}, {"stepping": "2"}, {"cache size": "2048 KB"},
                   {"flags": ZEN4["flags"] + " amx_bf16"}):  # fmt: skip
        monkeypatch.setattr(_info, "_cpuinfo", lambda fields={**ZEN4, **change}: fields)
        keys.append(_dispatch.cache_key())
    assert len(set(keys)) == len(keys)
    assert all("AMD EPYC" in key for key in keys)
    monkeypatch.setattr(_info, "_cpuinfo", lambda: dict(ZEN4))
    assert _dispatch.cache_key() == keys[0]  # the same CPU: the same key
    assert _info.cpu_model() == "AMD EPYC (family 25, model 17)"
    monkeypatch.setattr(_info, "_cpuinfo", dict)  # no /proc/cpuinfo
    assert _info.cpu_identity() == _info.cpu_model() and _info.cpu_model()


def test_decisions_follow_the_thread_count(fresh, monkeypatch):
    """A decision holds for the thread count it was measured at: after torch.set_num_threads the
    process takes the decision again for the new count (measured, or the disk cache's)."""
    monkeypatch.setenv("LOWRANK_CALIBRATION", "process")
    monkeypatch.setattr(_dispatch, "_steadiness_ms", lambda: 1.0)
    measured = []
    monkeypatch.setitem(_dispatch._PROBES, "cpu_fused_max_m/float32",
                        lambda: (measured.append(torch.get_num_threads()) or 16 * torch.get_num_threads(), {}))  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert _dispatch.decide("cpu_fused_max_m/float32") == 16 * threads
        torch.set_num_threads(threads + 1)
        assert _dispatch.decide("cpu_fused_max_m/float32") == 16 * (threads + 1)
    finally:
        torch.set_num_threads(threads)
    assert _dispatch.decide("cpu_fused_max_m/float32") == 16 * threads
    assert measured == [threads, threads + 1, threads]


def test_info_shows_decisions(fresh, monkeypatch):
    monkeypatch.setenv("LOWRANK_CALIBRATION", "process")
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: ("native", {"x": {"native": 1.0, "widen": 2.0}}))
    _dispatch.decide("cpu_bf16_gemm")
    report = lowrank.info()
    assert report["dispatch"]["cpu_bf16_gemm"] == "native"
    assert report["dispatch_timings_ms"]["cpu_bf16_gemm"] == {"x": {"native": 1.0, "widen": 2.0}}
    assert report["calibration"] == "process" and "threads" in report["calibration_key"]


@pytest.mark.parametrize("choice", ["native", "widen"])
def test_bf16_gemm_choice_gives_the_same_contract(fresh, monkeypatch, choice):
    """Either choice keeps fp32 accumulation: the LoRA and NF4 many-token bf16 paths stay within the
    dtype's precision of the float64 answer whatever the machine measured."""
    monkeypatch.setitem(_dispatch._decisions, "cpu_bf16_gemm", _dispatch.Decision(choice, "pinned"))
    assert _gemm.cpu_bf16_gemm_native() == (choice == "native")
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {torch.bfloat16: 0, torch.float32: 0})
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 0)
    torch.manual_seed(0)
    x = torch.randn(40, 96).bfloat16()
    dense = torch.nn.Linear(96, 72)
    for layer in (lowrank.LoRALinear.from_linear(torch.nn.Linear(96, 72).bfloat16(), r=4),
                  lowrank.QLoRALinear.from_linear(dense, r=4, compute_dtype=torch.bfloat16)):  # fmt: skip
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
            y = layer(x)
            w = layer.weight.double() if isinstance(layer, lowrank.LoRALinear) else layer.dequantize(torch.float32).double()
            exact = x.double() @ w.t() + layer.bias.double() + layer.scaling * (
                x.double() @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
        err = (y.double() - exact).abs().max().item()
        assert err <= 2**-7 * exact.abs().max().item(), (type(layer).__name__, err)


@pytest.mark.parametrize("make", [
    lambda: lowrank.LoRALinear(67, 41, r=4),
    lambda: lowrank.VeRALinear(67, 41, r=8),
    lambda: lowrank.QLoRALinear(128, 41, r=4),
], ids=["lora", "vera", "qlora"])  # fmt: skip
def test_eager_direct_calls_match_the_op_registry(monkeypatch, make):
    """ops/_direct.py: eager calls skip torch.library's dispatch and Function.apply's argument binding;
    they must give the same bits as going through the registry."""
    from lowrank.ops import _direct

    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(5, layer.in_features)

    def run():
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        grads = [xx.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad()
        with torch.no_grad():
            return [y.detach(), layer(x)] + grads

    direct = run()
    monkeypatch.setattr(_direct, "ok", lambda t: False)
    monkeypatch.setattr(_direct, "apply", lambda function, *args: function.apply(*args))
    registry = run()
    for a, b in zip(direct, registry, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemm", ["native", "widen"])
def test_tile_output_layout_gives_the_same_bits(fresh, monkeypatch, dtype, gemm):
    """``cpu_tile_buffer_max_m``: a tiled GEMM's products go to an [n, M] buffer (copied into rows) or
    straight into the output's columns. Only the speed may differ: QLoRA's many-token forward and input
    gradient (NF4 decoded tile by tile) and a widened bf16 LoRA weight give identical bits both ways,
    and those bits are within the dtype's precision of float64."""
    monkeypatch.setitem(_dispatch._decisions, "cpu_bf16_gemm", _dispatch.Decision(gemm, "pinned"))
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {torch.bfloat16: 0, torch.float32: 0})
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_MAX_M", {torch.bfloat16: 0, torch.float32: 0})
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", 0)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", 0)
    monkeypatch.setattr(_runtime, "CPU_ADAPTER_PRODUCTS", {torch.bfloat16: True, torch.float32: True})
    torch.manual_seed(3)
    m, k, n = 37, 192, 83
    qlora = lowrank.QLoRALinear.from_linear(torch.nn.Linear(k, n), r=4, compute_dtype=dtype)
    lora = lowrank.LoRALinear.from_linear(torch.nn.Linear(k, n).to(dtype), r=4)
    x0 = torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    outs = {}
    limits = (0, _dispatch.UNBOUNDED)
    for limit in limits:
        monkeypatch.setattr(_runtime, "CPU_TILE_BUFFER_MAX_M", {torch.float32: limit, torch.bfloat16: limit})
        for name, layer in (("qlora", qlora), ("lora", lora)):
            torch.manual_seed(5)
            with torch.no_grad():
                layer.lora_B.weight.normal_(0, 0.1)
            x = x0.clone().requires_grad_()
            y = layer(x)
            y.backward(dy)
            assert y.is_contiguous() and x.grad.is_contiguous(), (name, limit)  # rows either way, as nn.Linear's
            outs[name, limit] = (y.detach(), x.grad)
    for name in ("qlora", "lora"):
        for a, b in zip(outs[name, limits[0]], outs[name, limits[1]]):
            assert torch.equal(a, b), name
        layer = qlora if name == "qlora" else lora
        w = layer.dequantize(torch.float32).double() if name == "qlora" else layer.weight.double()
        y, dx = outs[name, 0]
        a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        exact_y = x0.double() @ w.t() + layer.bias.double() + layer.scaling * (x0.double() @ a.t()) @ b.t()
        exact_dx = dy.double() @ w + layer.scaling * (dy.double() @ b) @ a
        tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
        assert (y.double() - exact_y).abs().max() <= tol * exact_y.abs().max(), name
        assert (dx.double() - exact_dx).abs().max() <= tol * exact_dx.abs().max(), name
