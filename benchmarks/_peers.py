"""What the peer benchmarks (bench_lora.py, bench_vera.py, bench_qlora.py) share: the timed call of
one layer in one mode, and the estimate that keeps a peer out when one call would take too long.

A case is any object with ``in_features``, ``out_features``, ``tokens``, ``dtype`` and ``mode``
(``"forward"`` or ``"forward_backward"``), a frozen dataclass so ``dataclasses.replace`` works.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import pytest
import torch
from torch import nn

from lowrank.bench import layer_call
from lowrank.bench import peft_lora_linear as peft_lora_layer  # noqa: F401  (shared with `lowrank bench`)

from ._report import format_ms, format_rate, format_ratio
from ._timing import QUICK, benchmark_within_budget, interleaved_medians, interleaved_rounds, seconds_per_call

# Longest call a peer may be estimated to take and still run. The slowest call run then is torch's
# bf16 forward+backward at 4096x11008, M=16 (8.7 s, estimated 8.3 s). Over it is torch's bf16
# backward on CPUs without AVX512-BF16/AMX: ``grad_y @ W`` takes 89 s per call at 4096x4096, M=512.
CALL_LIMIT_S = 30.0


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def timed_call(case, layer: nn.Module) -> Callable[[], object]:
    """What one timed call of ``layer`` does in ``case.mode`` (:func:`lowrank.bench.layer_call`)."""
    return layer_call(layer, case.mode, case.tokens, case.in_features, case.out_features, case.dtype)


def estimated_seconds_per_call(case, layer: nn.Module, probe_tokens: int = 1) -> float:
    """A warm call's time at ``probe_tokens`` tokens (at most M), scaled by M / probe_tokens; 0 in
    quick mode, where every case is small. One token is an upper bound for a GEMM-bound peer; a peer
    whose cost does not grow with M (bitsandbytes dequantizes the whole weight per call) needs a
    larger probe, or it would be skipped wrongly."""
    if QUICK:
        return 0.0
    probe = min(probe_tokens, case.tokens)
    return case.tokens / probe * seconds_per_call(timed_call(dataclasses.replace(case, tokens=probe), layer))


def split_too_slow(case, peers: dict[str, nn.Module], probe_tokens: int = 1):
    """The peers to run, and the estimated seconds per call of those over CALL_LIMIT_S."""
    estimates = {name: estimated_seconds_per_call(case, layer, probe_tokens) for name, layer in peers.items()}
    too_slow = {name: seconds for name, seconds in estimates.items() if seconds > CALL_LIMIT_S}
    return {name: layer for name, layer in peers.items() if name not in too_slow}, too_slow


def too_slow_note(group: str, too_slow: dict[str, float]) -> str:
    estimates = ", ".join(f"{name} ~{seconds:.0f} s" for name, seconds in too_slow.items())
    return f"{group}: not run, estimated per call over {CALL_LIMIT_S:.0f} s: {estimates}"


def benchmark_peer(benchmark, case, layer: nn.Module, peer: str, **extra_info) -> None:
    """One pytest-benchmark case: ``layer`` (the peer ``peer``) in ``case``'s group, skipped when its
    call is estimated over CALL_LIMIT_S. ``case.work(peer)`` goes into ``extra_info``."""
    estimate = estimated_seconds_per_call(case, layer)
    if estimate > CALL_LIMIT_S:
        pytest.skip(f"{peer}: ~{estimate:.0f} s per call estimated, over CALL_LIMIT_S = {CALL_LIMIT_S:.0f} s")
    benchmark.group = case.group
    benchmark.extra_info.update(case.work(peer), peer=peer, threads=torch.get_num_threads(), **extra_info)
    benchmark_within_budget(benchmark, timed_call(case, layer))


def interleaved(case, peers: dict[str, nn.Module], probe_tokens: int = 1):
    """``(median seconds by peer, rounds, too_slow)``: the peers not too slow, timed interleaved."""
    peers, too_slow = split_too_slow(case, peers, probe_tokens)
    calls = {name: timed_call(case, layer) for name, layer in peers.items()}
    rounds = interleaved_rounds(calls)
    return interleaved_medians(calls, rounds), rounds, too_slow


ADAPTER_COLUMNS = ("group", "nn.Linear", "lowrank", "PEFT", "lowrank/nn.Linear", "lowrank/PEFT",
                   "lowrank GB/s", "lowrank GFLOP/s", "rounds")  # fmt: skip


def add_adapter_row(table, case, median: dict[str, float], rounds: int, too_slow: dict[str, float]) -> None:
    """A row of an adapter table (ADAPTER_COLUMNS): nn.Linear, lowrank and PEFT side by side."""
    baseline, mine, peft, work = median.get("nn.Linear"), median.get("lowrank"), median.get("peft"), case.work("lowrank")
    table.add_row(
        case.group,
        format_ms(baseline),
        format_ms(mine),
        format_ms(peft),
        format_ratio(mine, baseline),
        format_ratio(mine, peft),
        format_rate(work["bytes"], mine),
        format_rate(work["flops"], mine),
        str(rounds),
    )
    if too_slow:
        table.notes.append(too_slow_note(case.group, too_slow))
