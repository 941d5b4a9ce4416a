"""How the benchmarks time things: quick mode, round budgets, and interleaved medians.

This machine has slow phases of up to 1.6x, so two timings taken at different moments do not
compare. Peers are compared by :func:`interleaved_medians` (lowrank.bench's, which `lowrank bench`
uses too), which calls them in turn (A, B, C, B, C, A, C, A, B, ...) inside one loop so every peer
sees the same phases, and reports each one's median. The pytest-benchmark cases
(:func:`benchmark_within_budget`) stay useful for their JSON output and history, but their ratios
are only as good as the machine was steady.

Rounds follow from a time budget and one warm call's time, so a 2.8 s call (torch's bf16 forward
at 4096x11008, M=512, on this AVX2 CPU) gets MIN_ROUNDS and a 5 ms call a few hundred.

``LOWRANK_BENCH_QUICK=1`` (CI): every timed function runs exactly once, no warm-up.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from lowrank.bench import interleaved_medians  # noqa: F401  (the one implementation, shared with `lowrank bench`)

QUICK = os.environ.get("LOWRANK_BENCH_QUICK", "0") == "1"

BENCHMARK_BUDGET_S = 1.0  # timed seconds per pytest-benchmark case (pytest-benchmark's own default)
INTERLEAVED_BUDGET_S = 3.0  # timed seconds per interleaved comparison, all peers together
MIN_ROUNDS = 3  # even a multi-second call gets a median of three
MAX_ROUNDS = 1000


def seconds_per_call(fn: Callable[[], object]) -> float:
    """One warm call's time: a first, untimed call pays the one-time costs (lowrank's first call
    in a process takes over a second), the second is timed."""
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds_within(budget_s: float, seconds_per_round: float) -> int:
    """How many rounds fit the budget, at least MIN_ROUNDS (1 in quick mode)."""
    if QUICK:
        return 1
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s / max(seconds_per_round, 1e-9))))


def benchmark_within_budget(benchmark, fn: Callable[[], object]):
    """Time ``fn`` with pytest-benchmark (pedantic mode, one call per round, already warm)."""
    rounds = 1 if QUICK else rounds_within(BENCHMARK_BUDGET_S, seconds_per_call(fn))
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def interleaved_rounds(fns: dict[str, Callable[[], object]]) -> int:
    """Rounds for :func:`interleaved_medians` within INTERLEAVED_BUDGET_S; warms every fn up."""
    if QUICK:
        return 1
    return rounds_within(INTERLEAVED_BUDGET_S, sum(seconds_per_call(fn) for fn in fns.values()))


def interleaved_rounds_warmed_once(fns: dict[str, Callable[[], object]],
                                   budget_s: float = INTERLEAVED_BUDGET_S) -> int:  # fmt: skip
    """:func:`interleaved_rounds` for calls of seconds (a whole model's training step or generate): one
    warm-up call per fn, not two, its time the estimate. A second warm call would cost as much as a
    timed round, and such calls get MIN_ROUNDS from the budget anyway (a first call's one-time costs
    only push the estimate further that way)."""
    if QUICK:
        return 1
    seconds = 0.0
    for fn in fns.values():
        start = time.perf_counter()
        fn()
        seconds += time.perf_counter() - start
    return rounds_within(budget_s, seconds)
