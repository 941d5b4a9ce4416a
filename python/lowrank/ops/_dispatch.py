"""Which CPU code path runs, chosen by what this machine measures — never by a CPU name.

The same code met an AMD EPYC (AVX2) where torch's bf16 GEMM is 6× slower than fp32, a Zen 4
(AVX512-BF16) where it is 2.5× faster, and a Sapphire Rapids (AMX) where it is 5× faster; where the
fused few-token kernels stop paying depends on the same things. So each choice is a short
measurement on first use, of the two candidate paths on one probe shape, interleaved:

- ``cpu_bf16_gemm``: ``"native"`` (torch's bf16 GEMM, fp32 accumulation inside) or ``"widen"`` (the
  bf16 weight widened to fp32 tile by tile into one reused workspace, then fp32 GEMMs). Probe:
  128 × 2048 × 2048, the forward ``x Wᵀ`` and the backward ``dy W`` together.
- ``cpu_fp32_gemm``: ``"torch"`` (torch.mm, MKL in the usual x86 build) or ``"onednn"`` (oneDNN's matmul
  through torch's ``mkldnn._linear_pointwise`` op) for the many-token fp32 products (ops/_gemm.py's
  ``linear`` and ``mm``). Probe: 256 × 1024 × 1536, ``x Wᵀ + C`` and ``dy W`` (W transposed), after checking
  that oneDNN's results agree with float64 within fp32 rounding. A 2-core Zen 4 VM measured oneDNN
  2.2× faster (MKL there runs at half the AVX-512 FMA rate); taken before every other probe, whose GEMM
  side then runs it.
- ``cpu_fused_max_m/<dtype>``: the largest token count M at which the fused LoRA row kernel (W
  streamed once, adapter in the same pass) still beats the GEMM path. Probe: 2048 → 4096, r=16,
  M = 1, 16, 64, 256 (stopping at the first loss). The weight is read cold (copies adding up to twice the
  last-level cache, used in turn), as in a model whose layers do not all fit in cache.
- ``cpu_rows_max_m/<dtype>``: the same for a frozen weight's product alone, no adapter and no gradient
  wanted (ops/lora.py's ``frozen_linear``: an output head lowrank froze, a layer's base with its adapters
  merged or disabled): the row kernel against the GEMM path it would otherwise take (the measured fp32
  GEMM; for bf16 torch's, or W widened where ``cpu_bf16_gemm`` chose that). Probe: a head-like
  1024 → 16384 (cold), M = 1, 8, 16, 64.
  A Zen 4 ran SmolLM2's bf16 head (576 → 49152) at M = 1 in 3.6 ms against torch's 5.6 and GPT-2's
  fp32 one (768 → 50257) at M = 8 in 8.6 against 26, but lost at M = 32 in bf16.
- ``cpu_input_grad_max_m/<dtype>``: the same for the few-token ``dx = dy W + g A`` kernel; M = 1, 4,
  8, 16, 32, 64.
- ``cpu_input_grad_bf16_rows``: for a bf16 dy in that kernel (bf16 W), ``"dot"`` (AVX512-BF16 products
  over pairs of W's rows interleaved in registers: exact, summed in fp32) or ``"widen"`` (dy widened to
  fp32, fp32 FMAs over W widened). Probe: 2048 → 4096, r=16, M = 16 (cold weights). Not measured where
  the kernel variant has no AVX512-BF16 ("widen"). Measured before ``cpu_input_grad_max_m/bfloat16``,
  whose fused side runs it.
- ``cpu_adapter_products_max_r/<dtype>``: the largest rank at which ``"kernel"``
  (csrc/cpu/adapter_products.cpp: the adapter's gradients from one pass over dy and one over x_a, both
  read in their own dtype) beats ``"gemm"`` (the fp32 GEMMs of ``cpu_fp32_gemm``, a bf16 dy or x_a
  widened first); 0 where the GEMMs win at r=16. Probe: the LoRA adapter backward at 512 tokens,
  1536 → 1536, r = 16, 64, 256 (a skinny product is the kernel's business, a VeRA-sized one a GEMM's:
  a Zen 4 measured fp32 0.30 against 0.62 ms at r=16, 4.8 against 3.1 ms at r=256). Every other use of
  the kernel follows it: the QLoRA and VeRA backward and the bf16 many-token forwards' ``u = x_a Aᵀ``.
- ``nf4_cpu_fused_max_m/<dtype>`` / ``nf4_cpu_input_grad_max_m/<dtype>``: the NF4 fused dequant kernels
  (4096 × 4096) against dequantizing tile by tile for the GEMM; M = 1, 16, 64, 256 and 1, 4, 8, 16, 32,
  64. For a bf16 grad_y the input gradient's GEMM side is torch's bf16 GEMM over bf16 tiles where that
  is the fast one, its kernel side fp32 products or the bf16 ones below: a Zen 4 measured the kernel
  faster up to M = 64 for fp32 and 16 for bf16, so each dtype has its own crossover.
- ``nf4_cpu_input_grad_bf16_dot_from_m``: for a bf16 dy in that kernel, the fewest dy rows from which it
  takes AVX512-BF16 products over W rounded once to bf16 (two rows of W per instruction; below, dy is
  widened against the exact fp32 W), 0 for never. The products' decode costs more per row of W and is
  shared by the tile's dy rows: a Zen 4 measured them 7-10 % slower at M = 1 and 11-21 % faster at M = 16.
  Probe: 4096 × 4096 at M = 1, 2, 4, 16; the smallest M from which they won at every larger probe. Not
  measured where the kernel variant has no AVX512-BF16 (0). Measured before
  ``nf4_cpu_input_grad_max_m/bfloat16``, whose kernel side runs it.
- ``nf4_cpu_bf16_rows``: for a bf16 x in the NF4 rows kernel, ``"dot"`` (AVX512-BF16 products over W
  decoded in fp32 and rounded once to bf16, DESIGN's contract for a 16-bit compute dtype) or
  ``"widen"`` (x widened to fp32 against the exact fp32 W). Probe: 4096 × 4096 at M = 1 and 16; "dot"
  only where it wins both. Not measured where the kernel variant has no AVX512-BF16 ("widen").
- ``nf4_cpu_tiled_m/<dtype>``: ``[lo, hi, widen]``, the token counts at which few-token inference (no
  gradients) takes the tiled NF4 layout (ops/nf4.py's ``TiledWeight``: a copy of the codes in tiles
  of 16 rows, one 512-bit lane per output row, csrc/cpu/nf4_tiled.cpp) rather than the row-major path
  the decisions above choose. Probe: 4096 x 4096 (cold weights), M = 1, 4, 16, 64, 256; ``lo`` is the
  first M where the tiled kernel won and ``hi`` the last of the unbroken run of wins from there
  (``[0, 0, 0]``: never, also where the kernel variant has no tiled kernel for the dtype). For bf16 a
  third value, measured first: the largest M (of 1, 4, 16) to which the tiled kernel is faster with x
  widened to fp32 (exact W: the decode skips W's bf16 rounding, which costs more than the bf16
  products save when few x rows share it) than with x read as bf16 (256, every M, where the kernel
  variant has AVX-512 but no AVX512-BF16).
- ``cpu_lora_bf16_rows``: for a bf16 x in the fused LoRA row kernel (bf16 W), ``"dot"`` (AVX512-BF16
  products: exact, summed in fp32) or ``"widen"`` (x widened to fp32, fp32 FMAs over W widened in
  registers). Probe: 2048 → 4096, r=16, M = 16 (cold weights), where the products are what the kernel
  spends its time on (M = 1 streams W either way). Not measured where the kernel variant has no
  AVX512-BF16 ("widen"). Measured before ``cpu_fused_max_m/bfloat16``, whose fused side runs it.
- ``cpu_tile_buffer_max_m/<dtype>``: where the tiled GEMMs (a weight decoded or widened tile by tile)
  put each tile's product: the largest M at which an ``[n, M]`` buffer, copied into rows at the end,
  beats writing straight into the tile's columns of ``[M, n]`` (a strided ``out``). The same
  bits either way; the speed is the GEMM library's business (a Zen 4's fp32 GEMM ran 3× slower into
  columns at M = 16 and 4 % faster at M = 512; its bf16 GEMM was never slower). The copy is part of
  the op, so part of the probe: the buffer's transposed view had been returned as it was, every
  consumer copied it (the next projection, the SiLU product, attention, the norm), and the probe,
  timing the GEMMs alone, saw a tie at M = 256 on a Zen 5 and chose the buffer, under which a bf16
  QLoRA training step of 2 × 128 tokens ran 1.19× slower than with rows. Probe: 2048 × 2048 from a
  weight's row tiles, M = 16, 64, 256. The QLoRA bf16 input gradient's column tiles follow the bf16
  decision (products ``[M, cols]`` into dx's columns, or ``[cols, M]`` into a buffer copied into rows).

- ``cpu_parallel_min_work``: the fewest multiply-adds a thread is given in the few-token kernels (LoRA
  and NF4 rows, input gradients, adapter products, attention; csrc/cpu/dispatch.cpp): a smaller call
  runs on fewer threads than torch's count, since waking another costs microseconds (a Zen 5 VM: a
  64 -> 64 row at M = 1 in 0.4 µs on one thread, 2.9 on two). Probe: the fp32 row kernel at M = 1 over
  a warm s × s weight, s = 64, 128, ..., 2048, on one thread and on all of them; the first size at
  which all threads won by 5 % (a tie keeps one thread: the kernel may split a small call into one
  task) sets it to s² / threads (from that work on, every thread has its share; 0 where they win at
  64, and 2048² where they never do). Not measured with one thread (0). Measured at the first kernel
  call of whatever runs first, which may be another probe.

A decision is the largest probed M at which the fused path won every probe up to it (never more than
the largest probe; for the fused kernels against the GEMM path, coming within ``FUSED_TIE`` — 5 % — of
the GEMM's time counts as a win: the probes read weights cold, where both stream W once and tie). Each comparison is at least two independent interleaved sets (three when they
disagree), each candidate taking the least of its set medians, so one burst of other work cannot
decide it; the timings that made it are kept and shown by ``lowrank.info()``. A fixed
small GEMM is timed before and after each probe: when it changed by more than ``STEADY_RATIO``,
something else had the machine, and the decision is used by this process but not cached. Decisions are cached per process and, by default, on disk
(``$LOWRANK_CACHE_DIR`` or ``~/.cache/lowrank``, ``calibration.json``), keyed by what they depend on:
lowrank's and torch's versions, the CPU kernel variant, the thread count and the CPU
(``_info.cpu_identity``: its name, family, model, stepping, cache size and flags, since VMs on a
Zen 4 and on a Zen 5 both call theirs "AMD EPYC").
``LOWRANK_CALIBRATION=process`` measures without the disk cache; ``off`` uses the conservative
built-in defaults (no measuring) — for reproducible runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .._info import cpu_identity

UNBOUNDED = 1 << 62
# Bumped when the probes change, so decisions measured the old way are measured again. (A change to the
# kernels they time changes the build's source hash, also in the key.)
CALIBRATION_VERSION = 9
STEADY_RATIO = 1.3  # the steadiness workload's time may change this much across a probe and be cached

# What runs when calibration is off: the fused kernels where they were written for (few tokens),
# widened bf16 GEMMs (never slower than fp32 GEMM).
DEFAULTS: dict[str, Any] = {
    "cpu_parallel_min_work": 0,
    "cpu_bf16_gemm": "widen",
    "cpu_fp32_gemm": "torch",
    "cpu_fused_max_m/float32": 64,
    "cpu_fused_max_m/bfloat16": 64,
    "cpu_rows_max_m/float32": 16,
    "cpu_rows_max_m/bfloat16": 16,
    "cpu_input_grad_max_m/float32": 16,
    "cpu_input_grad_max_m/bfloat16": 16,
    "cpu_adapter_products_max_r/float32": 0,
    "cpu_adapter_products_max_r/bfloat16": 0,
    "nf4_cpu_fused_max_m/float32": 64,
    "nf4_cpu_fused_max_m/bfloat16": 64,
    "nf4_cpu_input_grad_max_m/float32": 8,
    "nf4_cpu_input_grad_max_m/bfloat16": 8,
    "nf4_cpu_bf16_rows": "widen",
    "nf4_cpu_input_grad_bf16_dot_from_m": 0,
    "nf4_cpu_tiled_m/float32": [0, 0, 0],
    "nf4_cpu_tiled_m/bfloat16": [0, 0, 0],
    "cpu_lora_bf16_rows": "widen",
    "cpu_input_grad_bf16_rows": "widen",
    "cpu_tile_buffer_max_m/float32": 256,
    "cpu_tile_buffer_max_m/bfloat16": 0,
}


@dataclass
class Decision:
    value: Any
    source: str  # "measured", "disk cache" or "default (LOWRANK_CALIBRATION=off)"
    seconds: float = 0.0  # how long measuring took
    timings_ms: dict = field(default_factory=dict)  # candidate -> median ms, per probed M


_decisions: dict[str, Decision] = {}
_lock = threading.RLock()
_decided_under: Optional[int] = None  # the thread count the decisions in _decisions hold for


def mode() -> str:
    value = os.environ.get("LOWRANK_CALIBRATION", "disk").strip().lower()
    if value not in ("disk", "process", "off"):
        raise ValueError(f"LOWRANK_CALIBRATION: expected 'disk', 'process' or 'off', got {value!r}")
    return value


def _follow_thread_count() -> None:
    """Decisions hold for one thread count: when ``torch.set_num_threads`` changed it since they were
    taken, this process's decisions are dropped, to be taken again (from the disk cache where it has
    them). (A kernel variant forced with ``_C.set_cpu_isa`` is a test's or benchmark's business: it
    pins what it measures.)"""
    global _decided_under
    threads = torch.get_num_threads()
    if threads != _decided_under:
        with _lock:
            if _decided_under is not None and threads != _decided_under:
                _decisions.clear()
            _decided_under = threads


def decide(name: str) -> Any:
    """The value of decision ``name``, measured on first use (then cached) for this thread count."""
    _follow_thread_count()
    d = _decisions.get(name)
    if d is not None:
        return d.value
    with _lock:
        d = _decisions.get(name)
        if d is None:
            d = _make(name)
            _decisions[name] = d
    return d.value


def report(include_disk: bool = False) -> dict:
    """The decisions taken so far: value, where it came from, and the timings that chose it
    (``include_disk``: also those the disk cache holds for this machine and this process has not
    needed yet)."""
    out = {name: asdict(d) for name, d in _decisions.items()}
    if include_disk and mode() == "disk":
        for name, cached in _read_cache().items():
            if name not in out and name in DEFAULTS and isinstance(cached, dict) and "value" in cached:
                out[name] = asdict(Decision(cached["value"], "disk cache", 0.0, cached.get("timings_ms", {})))
    return dict(sorted(out.items()))


def calibrate(names: Optional[list[str]] = None) -> dict:
    """Takes every decision (or ``names``) now rather than on first use; returns :func:`report`."""
    for name in names or list(DEFAULTS):
        decide(name)
    return report()


def reset() -> None:
    """Forgets this process's decisions (the disk cache stays)."""
    global _decided_under
    with _lock:
        _decisions.clear()
        _decided_under = None


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def cache_key() -> str:
    from .. import _C

    return " | ".join((
        f"lowrank {_C.build_info()['version']} kernels {_C.build_info()['source_hash']} calibration {CALIBRATION_VERSION}",
        f"torch {torch.__version__}",
        f"isa {_C.cpu_isa()}",
        f"threads {torch.get_num_threads()}",
        cpu_identity(),
    ))  # fmt: skip


def cache_file() -> Path:
    root = os.environ.get("LOWRANK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowrank")
    return Path(root) / "calibration.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
        entry = data.get(cache_key(), {}) if isinstance(data, dict) else {}
        return entry if isinstance(entry, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(name: str, d: Decision) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(cache_key(), {})[name] = {"value": d.value, "timings_ms": d.timings_ms}
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        pass  # a read-only home is no reason to fail: the decision still holds for this process


def _make(name: str) -> Decision:
    if name not in DEFAULTS:
        raise KeyError(f"unknown dispatch decision {name!r}; known: {sorted(DEFAULTS)}")
    how = mode()
    if how == "off":
        return Decision(DEFAULTS[name], "default (LOWRANK_CALIBRATION=off)")
    if how == "disk":
        cached = _read_cache().get(name)
        if isinstance(cached, dict) and "value" in cached:
            return Decision(cached["value"], "disk cache", 0.0, cached.get("timings_ms", {}))
    if name not in ("cpu_fp32_gemm", "cpu_bf16_gemm", "cpu_parallel_min_work"):
        decide("cpu_fp32_gemm")  # taken first: a probe's GEMM side runs the fp32 GEMM it chose
    before = min(_steadiness_ms() for _ in range(5))
    start = time.perf_counter()
    value, timings = _PROBES[name]()
    seconds = round(time.perf_counter() - start, 3)
    after = min(_steadiness_ms() for _ in range(5))
    # Another job on the machine skews a probe; such a decision holds for this process only.
    steady = max(before, after) <= STEADY_RATIO * min(before, after)
    d = Decision(value, "measured" if steady else "measured while the machine was busy (not cached)", seconds, timings)
    if how == "disk" and steady:
        _write_cache(name, d)
    return d


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def _interleaved_ms(calls: dict[str, Callable[[], Any]], rounds: int = 5) -> dict[str, float]:
    """Median ms per candidate, the candidates run alternately (A, B, A, B, ...) after a warm-up."""
    warm = 0.0
    for call in calls.values():
        t = time.perf_counter()
        call()
        warm = max(warm, time.perf_counter() - t)
    rounds = rounds if warm < 0.01 else 3  # calls of 10 ms and more: three rounds tell them apart
    times: dict[str, list] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            t = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t)
    return {k: round(1e3 * statistics.median(v), 4) for k, v in times.items()}


def _compared_ms(calls: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Per candidate, the least of the medians of independent interleaved sets: two sets, a third when
    they disagree on which candidate is faster. Other work on the machine only ever adds time, and one
    set can be caught by a burst of it (seen on a Zen 4: the fused M=1 probe read 6.1 ms against the
    GEMM's 2.0 ms in a set, where the fused kernel takes 1.0 ms and the GEMM 1.8 ms), so a verdict rests
    on the quietest set each candidate had. ``sets`` says how many ran."""
    sets = [_interleaved_ms(calls), _interleaved_ms(calls)]
    winner = [min(t, key=t.get) for t in sets]
    if winner[0] != winner[1]:
        sets.append(_interleaved_ms(calls))
    best = {k: min(t[k] for t in sets) for k in calls}
    best["sets"] = len(sets)
    return best


# A fused few-token kernel within this fraction of the GEMM path's time at a probe counts as winning it.
# The probes read their weights cold, where both paths stream W once from memory and come out within a
# few percent at M = 16 (a Zen 4, LoRA fp32: 1.27-1.47 against 1.32-1.38 ms over eight probes, so the
# verdict flipped between calibrations); a weight that sits in cache (a small model's layers, or a
# benchmark's) runs the fused kernel up to 2x faster there (576 -> 1536, M = 16: 0.12 against 0.25 ms),
# and it allocates nothing. So a near-tie goes to it; a clear loss (those 1.41-1.47) does not.
FUSED_TIE = 0.05


def _crossover(
    ms: list[int], fused: Callable[[int], Callable], other: Callable[[int], Callable], names=("fused", "gemm"),
    tie: float = 0.0,
) -> tuple[int, dict]:
    """The last of ``ms``, in the order probed, where ``fused`` beat ``other`` (or came within ``tie`` of its
    time) at it and every earlier probe; 0 if it lost the first. Ascending ``ms`` give the largest M up to
    which ``fused`` wins (never beyond the largest probe: what was not measured is not assumed), descending
    ones the smallest M from which it does. ``names``: the two as the timings call them."""
    limit, timings = 0, {}
    for m in ms:
        t = _compared_ms({names[0]: fused(m), names[1]: other(m)})
        timings[str(m)] = t
        if t[names[0]] > t[names[1]] * (1.0 + tie):
            break
        limit = m
    return limit, timings


def _steadiness_ms() -> float:
    """A fixed small workload (fp32 GEMMs), timed: run before and after a probe, a change tells that
    something else took the machine meanwhile."""
    a = torch.ones(256, 256)
    torch.mm(a, a)  # warm: threads awake, buffers allocated
    t = time.perf_counter()
    for _ in range(8):
        torch.mm(a, a)
    return 1e3 * (time.perf_counter() - t)


class _pinned:
    """Temporarily pins a ``_runtime`` limit (the probes run one path, then the other)."""

    def __init__(self, attr: str, value):
        from . import _runtime

        self.runtime, self.attr, self.value = _runtime, attr, value

    def __enter__(self):
        self.before = getattr(self.runtime, self.attr)
        setattr(self.runtime, self.attr, self.value)

    def __exit__(self, *exc):
        setattr(self.runtime, self.attr, self.before)


def _probe_bf16_gemm() -> tuple[str, dict]:
    from . import _gemm

    g = torch.Generator().manual_seed(0)
    m, k, n = 128, 2048, 2048
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    dy = torch.randn(m, n, generator=g).bfloat16()
    t = _compared_ms({
        "native": lambda: (torch.mm(x, w.t()), torch.mm(dy, w)),
        "widen": lambda: (_gemm.linear_t_fp32(x.float(), w), _gemm.matmul_fp32(dy.float(), w)),
    })  # fmt: skip
    return ("native" if t["native"] < t["widen"] else "widen"), {f"{m}x{k}x{n} fwd+bwd": t}


def _probe_fp32_gemm() -> tuple[str, dict]:
    """``"onednn"`` where oneDNN's fp32 GEMM (torch's mkldnn linear op) beats torch.mm's on the many-token
    products (x Wᵀ with a term added, dy W through W's transposed view) and agrees with it; else
    ``"torch"`` (also where this torch has no oneDNN)."""
    from . import _gemm

    if not _gemm.onednn_available():
        return "torch", {}
    g = torch.Generator().manual_seed(0)
    m, k, n = 256, 1024, 1536
    w = torch.randn(n, k, generator=g) * 0.02
    x, dy, c = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)

    def call(engine: str):
        def run():
            with _pinned("CPU_FP32_GEMM", engine):
                return _gemm.linear(x, w, add=c), _gemm.mm(dy, w)

        return run

    try:
        got = call("onednn")()
    except RuntimeError as exc:  # an op this build registers but cannot run
        return "torch", {"onednn failed": str(exc)[:200]}
    # Within 8·sqrt(K) fp32 roundings of the |term| sums (fp32 accumulation in any order), else not used.
    exact = (x.double() @ w.double().t() + c.double(), dy.double() @ w.double())
    magnitude = ((x.double().abs() @ w.double().abs().t() + c.double().abs()).max().item(),
                 (dy.double().abs() @ w.double().abs()).max().item())  # fmt: skip
    bound = [8 * math.sqrt(depth) * 2.0**-24 * mag for depth, mag in zip((k, n), magnitude)]
    errors = [(a.double() - b).abs().max().item() for a, b in zip(got, exact)]
    if not all(e <= b for e, b in zip(errors, bound)):
        return "torch", {"onednn disagreed": {"max error": errors, "bound": bound}}
    t = _compared_ms({"torch": call("torch"), "onednn": call("onednn")})
    return ("onednn" if t["onednn"] < t["torch"] else "torch"), {f"{m}x{k}x{n} fwd+bwd": t}


def _llc_bytes() -> int:
    """The last-level cache's size (32 MiB when the system does not say)."""
    try:
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        return max(sizes) if sizes else 32 << 20
    except (OSError, ValueError):
        return 32 << 20


def _cold_copies(make: Callable[[], Any], nbytes: int) -> Callable[[], Any]:
    """Enough copies of a weight to add up to twice the last-level cache, handed out in turn, so each
    timed call reads its weight from memory, as decoding a model does (its layers do not fit)."""
    copies = [make() for _ in range(max(1, min(8, -(-2 * _llc_bytes() // max(nbytes, 1)))))]
    turn = iter(range(1 << 62))
    return lambda: copies[next(turn) % len(copies)]


def _lora_probe_weights(dtype: torch.dtype, k: int = 2048, n: int = 4096, r: int = 16):
    g = torch.Generator().manual_seed(0)
    w = _cold_copies(lambda: (torch.randn(n, k, generator=g) * 0.02).to(dtype), n * k * dtype.itemsize)
    a = (torch.randn(r, k, generator=g) * 0.02).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.02).to(dtype)
    return g, w, a, b, k, n


def _probe_fused(dtype: torch.dtype) -> tuple[int, dict]:
    from . import lora

    g, weights, a, b, k, _ = _lora_probe_weights(dtype)
    if dtype == torch.bfloat16:
        from . import _runtime

        _runtime.cpu_lora_bf16_dot()  # decided first: the fused side of this probe runs what it chose

    def call(m: int, limit: int):
        x = torch.randn(m, k, generator=g).to(dtype)

        def run():
            with _pinned("CPU_FUSED_MAX_M", {dtype: limit}):
                return lora._forward_native(x, weights(), None, a, b, 2.0, None)

        return run

    return _crossover([1, 16, 64, 256], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), tie=FUSED_TIE)


def _probe_rows(dtype: torch.dtype) -> tuple[int, dict]:
    from . import lora

    g = torch.Generator().manual_seed(0)
    k, n = 1024, 16384
    weights = _cold_copies(lambda: (torch.randn(n, k, generator=g) * 0.02).to(dtype), n * k * dtype.itemsize)
    if dtype == torch.bfloat16:
        from . import _runtime

        _runtime.cpu_lora_bf16_dot()  # decided first: the kernel side of this probe runs what it chose

    def call(m: int, limit: int):
        x = torch.randn(m, k, generator=g).to(dtype)

        def run():
            with _pinned("CPU_ROWS_MAX_M", {dtype: limit}), torch.no_grad():
                return lora.frozen_linear(x, weights())

        return run

    return _crossover([1, 8, 16, 64], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), ("rows", "gemm"),
                      tie=FUSED_TIE)  # fmt: skip


def _probe_input_grad(dtype: torch.dtype) -> tuple[int, dict]:
    from . import lora

    g, weights, a, _, _, n = _lora_probe_weights(dtype)
    if dtype == torch.bfloat16:
        from . import _runtime

        _runtime.cpu_input_grad_bf16_dot()  # decided first: the fused side of this probe runs what it chose

    def call(m: int, limit: int):
        dy = torch.randn(m, n, generator=g).to(dtype)
        gg = torch.randn(m, a.shape[0], generator=g)

        def run():
            with _pinned("CPU_INPUT_GRAD_MAX_M", {dtype: limit}):
                return lora._backward_input_native(dy, weights(), gg, a)

        return run

    return _crossover([1, 4, 8, 16, 32, 64], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), tie=FUSED_TIE)


def _probe_input_grad_bf16_rows() -> tuple[str, dict]:
    from . import lora

    def make(m: int):
        g, weights, a, _, _, n = _lora_probe_weights(torch.bfloat16)
        dy, gg = torch.randn(m, n, generator=g).bfloat16(), torch.randn(m, a.shape[0], generator=g)
        return lambda: lora._backward_input_native(dy, weights(), gg, a)

    return _probe_bf16_dot("CPU_INPUT_GRAD_MAX_M", "CPU_INPUT_GRAD_BF16_DOT", make)


def _probe_adapter_products(dtype: torch.dtype) -> tuple[int, dict]:
    from . import lora

    gen = torch.Generator().manual_seed(0)
    m, k, n = 512, 1536, 1536
    dy, xa = torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, k, generator=gen).to(dtype)

    def call(r: int, kernel: bool):
        u = torch.randn(m, r, generator=gen)
        a, b = (torch.randn(r, k, generator=gen) * 0.02).to(dtype), (torch.randn(n, r, generator=gen) * 0.02).to(dtype)

        def run():
            with _pinned("CPU_ADAPTER_PRODUCTS", {dtype: kernel}):
                return lora._backward_adapter_native(dy, xa, u, a, b, 2.0)

        return run

    limit, timings = _crossover([16, 64, 256], lambda r: call(r, True), lambda r: call(r, False), ("kernel", "gemm"))
    return limit, {f"{m}x{k}x{n} adapter backward, r={r}": t for r, t in timings.items()}


def _nf4_probe_weights(k: int = 4096, n: int = 4096):
    import lowrank

    g = torch.Generator().manual_seed(0)

    def make():
        st = lowrank.quantize_nf4(torch.randn(n, k, generator=g) * 0.02)
        return (st["codes"], st["absmax"], st["absmax2"], st["code2"], st["offset"], [n, k], 64, 256)

    return g, _cold_copies(make, n * k // 2), k, n


def _probe_nf4_fused(dtype: torch.dtype) -> tuple[int, dict]:
    from . import nf4

    g, weights, k, _ = _nf4_probe_weights()
    if dtype == torch.bfloat16:
        from . import _runtime

        _runtime.nf4_cpu_bf16_dot()  # decided first: the fused side of this probe runs what it chose

    def call(m: int, limit: int):
        x = torch.randn(m, k, generator=g).to(dtype)

        def run():
            with _pinned("NF4_CPU_FUSED_MAX_M", limit):
                return nf4._forward_native(x, *weights(), None, None, None, 1.0, None)

        return run

    return _crossover([1, 16, 64, 256], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), tie=FUSED_TIE)


def _probe_nf4_bf16_rows() -> tuple[str, dict]:
    from .. import _C
    from . import nf4

    if not _C.cpu_bf16_dot():
        return "widen", {}  # nothing to measure: this kernel variant has no AVX512-BF16
    g, weights, k, _ = _nf4_probe_weights()
    timings, wins = {}, True
    for m in (1, 16):
        x = torch.randn(m, k, generator=g).bfloat16()

        def call(dot: bool, x=x):
            def run():
                with _pinned("NF4_CPU_FUSED_MAX_M", UNBOUNDED), _pinned("NF4_CPU_BF16_DOT", dot):
                    return nf4._forward_native(x, *weights(), None, None, None, 1.0, None)

            return run

        t = timings[str(m)] = _compared_ms({"dot": call(True), "widen": call(False)})
        wins = wins and t["dot"] < t["widen"]
    return ("dot" if wins else "widen"), timings


def _probe_nf4_tiled(dtype: torch.dtype) -> tuple[list, dict]:
    from .. import _C
    from . import _runtime, nf4

    if not _C.nf4_tiled_available(_C.DType.float32):
        return [0, 0, 0], {}  # nothing to measure: no tiled kernel in this kernel variant
    # bf16 x without AVX512-BF16: the tiled kernel can still take it widened (fp32 products)
    bf16_products = _C.nf4_tiled_available(nf4._DTYPE_CODES[dtype])
    _runtime.nf4_cpu_fused_max_m(dtype)  # decided first: the other side runs what they chose
    if dtype == torch.bfloat16:
        _runtime.nf4_cpu_bf16_dot()
    g = torch.Generator().manual_seed(0)
    k = n = 4096
    weights = _nf4_probe_weights(k, n)[1]
    tiled = _cold_copies(lambda: nf4.TiledWeight(nf4._weight(*weights())), n * k // 2)
    inputs = {m: torch.randn(m, k, generator=g).to(dtype) for m in (1, 4, 16, 64, 256)}

    def tiled_call(m: int, widen: bool):
        x = inputs[m]
        y = torch.empty(m, n, dtype=dtype)

        def run():
            x_in = x.float() if widen else x
            _C.nf4_rows_tiled_cpu(nf4.matrix("out", y), nf4.matrix("x", x_in), tiled().view, None, None, None, 1.0,
                                   _runtime.num_threads())  # fmt: skip

        return run

    timings: dict = {}
    widen_to = 0
    if dtype == torch.bfloat16 and not bf16_products:
        widen_to = 256  # the largest probe: every tiled call widens
    elif dtype == torch.bfloat16:
        widen_to, t = _crossover([1, 4, 16], lambda m: tiled_call(m, True), lambda m: tiled_call(m, False),
                                 ("widened", "bf16"))  # fmt: skip
        timings["x widened or bf16"] = t
    probes, wins = (1, 4, 16, 64, 256), []
    for m in probes:

        def run_rows(x=inputs[m]):  # (_forward_native never takes the tiled layout)
            return nf4._forward_native(x, *weights(), None, None, None, 1.0, None)

        t = timings[str(m)] = _compared_ms({"tiled": tiled_call(m, m <= widen_to), "rows": run_rows})
        wins.append(t["tiled"] < t["rows"])
    if not any(wins):
        return [0, 0, 0], timings
    first = wins.index(True)
    last = first
    while last + 1 < len(probes) and wins[last + 1]:
        last += 1
    return [probes[first], probes[last], widen_to], timings


def _probe_nf4_input_grad(dtype: torch.dtype) -> tuple[int, dict]:
    from . import nf4

    g, weights, _, n = _nf4_probe_weights()
    if dtype == torch.bfloat16:
        from . import _runtime

        _runtime.nf4_cpu_input_grad_bf16_dot(1)  # decided first: the kernel side of this probe runs what it chose

    def call(m: int, limit: int):
        dy = torch.randn(m, n, generator=g).to(dtype)

        def run():
            with _pinned("NF4_CPU_INPUT_GRAD_MAX_M", {dtype: limit}):
                return nf4._backward_input_native(dy, *weights(), None, None)

        return run

    return _crossover([1, 4, 8, 16, 32, 64], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), tie=FUSED_TIE)


def _probe_nf4_input_grad_bf16_dot() -> tuple[int, dict]:
    from .. import _C
    from . import nf4

    if not _C.cpu_bf16_dot():
        return 0, {}
    g, weights, _, n = _nf4_probe_weights()

    def call(m: int, dot: bool):
        dy = torch.randn(m, n, generator=g).bfloat16()

        def run():
            with _pinned("NF4_CPU_INPUT_GRAD_MAX_M", {torch.bfloat16: UNBOUNDED}):
                with _pinned("NF4_CPU_INPUT_GRAD_BF16_DOT", dot):
                    return nf4._backward_input_native(dy, *weights(), None, None)

        return run

    # largest first: from the first loss down, the products are not taken
    return _crossover([16, 4, 2, 1], lambda m: call(m, True), lambda m: call(m, False), names=("dot", "widen"))


def _probe_bf16_dot(limit: str, flag: str, make: Callable[[int], Callable[[], Any]]) -> tuple[str, dict]:
    """``"dot"`` or ``"widen"`` for a bf16 operand of a fused LoRA kernel: the call ``make(16)`` builds,
    with the kernel forced (``_runtime.<limit>`` unbounded for bf16) and ``_runtime.<flag>`` pinned each
    way. Nothing is measured where this kernel variant has no AVX512-BF16 ("widen")."""
    from .. import _C

    if not _C.cpu_bf16_dot():
        return "widen", {}
    m = 16
    run = make(m)

    def call(dot: bool):
        def timed():
            with _pinned(limit, {torch.bfloat16: UNBOUNDED}), _pinned(flag, dot):
                return run()

        return timed

    t = _compared_ms({"dot": call(True), "widen": call(False)})
    return ("dot" if t["dot"] < t["widen"] else "widen"), {str(m): t}


def _probe_lora_bf16_rows() -> tuple[str, dict]:
    from . import lora

    def make(m: int):
        g, weights, a, b, k, _ = _lora_probe_weights(torch.bfloat16)
        x = torch.randn(m, k, generator=g).bfloat16()
        return lambda: lora._forward_native(x, weights(), None, a, b, 2.0, None)

    return _probe_bf16_dot("CPU_FUSED_MAX_M", "CPU_LORA_BF16_DOT", make)


def _probe_tile_layout(dtype: torch.dtype) -> tuple[int, dict]:
    from . import _gemm

    g = torch.Generator().manual_seed(0)
    k = n = 2048
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    fill = _gemm._copy_rows(w)

    def call(m: int, limit: int):
        x = torch.randn(m, k, generator=g).to(dtype)

        def run():
            with _pinned("CPU_TILE_BUFFER_MAX_M", {dtype: limit}):
                return _gemm.linear_tiles(x, n, k, fill)  # (the buffer's side copies it into rows)

        return run

    return _crossover([16, 64, 256], lambda m: call(m, UNBOUNDED), lambda m: call(m, 0), ("buffer", "columns"))


PARALLEL_PROBE_SIZES = (64, 128, 256, 512, 1024, 2048)
PARALLEL_MARGIN = 0.05  # all threads must beat one by this fraction: a small kernel may run as one task either way


def _probe_parallel_min_work() -> tuple[int, dict]:
    """``s² // threads`` for the first probed ``s`` at which the fp32 row kernel (M = 1, a warm s × s
    weight) ran faster on all of torch's threads than on one; 0 where they won at the smallest, the
    largest s² where they never won. Each timing is a loop of calls (a call takes 0.4 µs and up), the
    kernel called straight through ``_C`` (no Python dispatch, no decision of its own)."""
    from .. import _C
    from .._validate import matrix

    threads = torch.get_num_threads()
    if threads <= 1:
        return 0, {}
    before = _C.parallel_min_work()
    _C.set_parallel_min_work(0)  # the probe's thread counts as given
    try:
        g = torch.Generator().manual_seed(0)
        timings: dict = {}
        for s in PARALLEL_PROBE_SIZES:
            w, x, y = torch.randn(s, s, generator=g), torch.randn(1, s, generator=g), torch.empty(1, s)
            mw, mx, my = matrix("w", w), matrix("x", x), matrix("out", y)
            reps = max(4, (1 << 20) // (s * s))  # ~1 M multiply-adds per timed loop

            def loop(t: int) -> Callable[[], None]:
                def run():
                    for _ in range(reps):
                        _C.lora_rows_cpu(my, mx, mw, None, None, None, None, None, 1.0, t)

                return run

            t = _compared_ms({"1 thread": loop(1), f"{threads} threads": loop(threads)})
            timings[f"{s}x{s} M=1, {reps} calls"] = t
            if t[f"{threads} threads"] < (1.0 - PARALLEL_MARGIN) * t["1 thread"]:  # a tie keeps one thread
                return (0 if s == PARALLEL_PROBE_SIZES[0] else s * s // threads), timings
        return PARALLEL_PROBE_SIZES[-1] ** 2, timings
    finally:
        _C.set_parallel_min_work(before)


_PROBES: dict[str, Callable[[], tuple[Any, dict]]] = {
    "cpu_parallel_min_work": _probe_parallel_min_work,
    "cpu_bf16_gemm": _probe_bf16_gemm,
    "cpu_fp32_gemm": _probe_fp32_gemm,
    "cpu_fused_max_m/float32": lambda: _probe_fused(torch.float32),
    "cpu_fused_max_m/bfloat16": lambda: _probe_fused(torch.bfloat16),
    "cpu_rows_max_m/float32": lambda: _probe_rows(torch.float32),
    "cpu_rows_max_m/bfloat16": lambda: _probe_rows(torch.bfloat16),
    "cpu_input_grad_max_m/float32": lambda: _probe_input_grad(torch.float32),
    "cpu_input_grad_max_m/bfloat16": lambda: _probe_input_grad(torch.bfloat16),
    "cpu_adapter_products_max_r/float32": lambda: _probe_adapter_products(torch.float32),
    "cpu_adapter_products_max_r/bfloat16": lambda: _probe_adapter_products(torch.bfloat16),
    "nf4_cpu_fused_max_m/float32": lambda: _probe_nf4_fused(torch.float32),
    "nf4_cpu_fused_max_m/bfloat16": lambda: _probe_nf4_fused(torch.bfloat16),
    "nf4_cpu_input_grad_max_m/float32": lambda: _probe_nf4_input_grad(torch.float32),
    "nf4_cpu_input_grad_max_m/bfloat16": lambda: _probe_nf4_input_grad(torch.bfloat16),
    "nf4_cpu_bf16_rows": _probe_nf4_bf16_rows,
    "nf4_cpu_input_grad_bf16_dot_from_m": _probe_nf4_input_grad_bf16_dot,
    "nf4_cpu_tiled_m/float32": lambda: _probe_nf4_tiled(torch.float32),
    "nf4_cpu_tiled_m/bfloat16": lambda: _probe_nf4_tiled(torch.bfloat16),
    "cpu_lora_bf16_rows": _probe_lora_bf16_rows,
    "cpu_input_grad_bf16_rows": _probe_input_grad_bf16_rows,
    "cpu_tile_buffer_max_m/float32": lambda: _probe_tile_layout(torch.float32),
    "cpu_tile_buffer_max_m/bfloat16": lambda: _probe_tile_layout(torch.bfloat16),
}
