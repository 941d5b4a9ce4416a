"""``lowrank bench``: a short kernel summary of this machine, in under a minute.

At one layer shape (``--shape IN,OUT``, default 576,1536: SmolLM2-135M's MLP) and M = 1, 16, 512
tokens it times four layers of lowrank, each beside two others over the same weight (no bias):

    case    lowrank              peer                                    nn.Linear
    LoRA    LoRALinear, r=--r    PEFT's LoRA Linear                      the frozen dense layer, in
    VeRA    VeRALinear, r=256*   PEFT's VeRA Linear                      the same dtype: the floor an
    NF4     NF4Linear            bitsandbytes Linear4bit (nf4, double    adapter cannot beat, and the
                                 quantization)                           layer a 4-bit one replaces
    QLoRA   QLoRALinear, r=--r   PEFT's LoRA over that Linear4bit

    * or the largest rank that fits the shape, min(256, IN, OUT); the table says which.

LoRA adapters have alpha = 2r and B drawn small and random (so the adapter term is not zero); the
peers hold the same adapter values. Passes: ``fwd`` at every M (eval mode, under ``torch.no_grad()``)
and ``fwd+bwd`` at M=512 (train mode: y, then ``torch.autograd.grad`` of y against a fixed random
grad_y for x and the trainable parameters; nn.Linear and NF4 have none, so x only). Inputs are made
once, outside the timing.

Timing: each row calls its three layers in turn, round after round (A B C, B C A, C A B, ...: the
first one rotates so none always follows the same neighbour), with the garbage collector off and the
device synchronized around every call, after two warm-up calls each. A row's time is each layer's
median. Rounds follow from ``--budget``: what is left of it is shared among the rows still to run,
at least MIN_ROUNDS each, so a slow machine gets fewer rounds, never fewer rows. Ratios are
lowrank's time over the other's: below 1, lowrank is faster. Times are warm-cache: at the default
shape the weight (3.4 MiB in fp32) stays in the last-level cache between calls.

lowrank chooses some CPU code paths by measuring this machine on first use (``lowrank/ops/
_dispatch.py``, ~8 s for all of them on a 2-core Zen 4, cached on disk). The bench takes the choices
not cached yet before its rows, outside the budget, and says so: a table of built-in defaults would
time code a user never runs (bf16 layers 4-5x slower on a Zen 4 whose bf16 GEMM is fast).

PEFT and bitsandbytes are optional; without them the peer columns read ``n/a (pip install ...)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

TOKENS = (1, 16, 512)
BACKWARD_TOKENS = 512  # forward+backward is timed at this M only
VERA_MAX_RANK = 256
LORA_B_STD = 0.01  # small random B: the adapter changes y without swamping it
VERA_D_MEAN, VERA_D_STD, VERA_B_STD = 0.1, 0.1, 0.01
MIN_ROUNDS = 3  # a median of three even when the budget is spent
MAX_ROUNDS = 2000  # a 20 µs call needs no more for a stable median
WARMUP_CALLS = 2  # the first lowrank call in a process pays one-time costs; the second is timed as the estimate
CASES = ("LoRA", "VeRA", "NF4", "QLoRA")
PEER_NAMES = {"LoRA": "PEFT", "VeRA": "PEFT", "NF4": "bnb", "QLoRA": "PEFT+bnb"}
PEER_PACKAGES = {"LoRA": ("peft",), "VeRA": ("peft",), "NF4": ("bitsandbytes",), "QLoRA": ("peft", "bitsandbytes")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
MODES = ("forward", "forward_backward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lowrank bench`` (checked by :func:`run`, which raises ValueError on bad ones)."""
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda", help="where to run (default: cpu)")
    parser.add_argument("--dtype", default="fp32", metavar="fp32|bf16",
                        help="dtype of the weights, inputs and compute (default: fp32)")  # fmt: skip
    parser.add_argument("--shape", default="576,1536", metavar="IN,OUT",
                        help="the layer's in and out features (default: 576,1536, SmolLM2-135M's MLP)")  # fmt: skip
    parser.add_argument("--r", default=16, metavar="R", help="LoRA and QLoRA rank (default: 16)")
    parser.add_argument("--threads", default=None, metavar="N",
                        help="CPU threads (torch.set_num_threads); default: torch's current setting")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object (machine, rows, notes)")
    parser.add_argument("--budget", default=40.0, metavar="SECONDS",
                        help="approximate total time of the run, warm-up included (default: 40); "
                             "fewer timed rounds when short, never fewer rows")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    device: torch.device
    dtype: torch.dtype
    in_features: int
    out_features: int
    rank: int
    vera_rank: int
    threads: Optional[int]
    budget_s: float
    json: bool


def _positive_int(option: str, value) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{option}: expected a positive integer, got {value!r}")
    return int(text)


def parse_options(args: argparse.Namespace) -> Options:
    """The checked options, or a ValueError naming the bad one (expected vs. got)."""
    device = str(getattr(args, "device", "cpu")).strip().lower()
    if device not in DEVICES:
        raise ValueError(f"--device: expected one of {', '.join(DEVICES)}, got {args.device!r}")
    if device == "cuda":
        from . import info

        if not info()["gpu_usable"]:
            why = "lowrank was built without CUDA kernels" if torch.cuda.is_available() else "no CUDA GPU is visible"
            raise ValueError(f"--device: cuda requested, but {why}")
    dtype_name = str(getattr(args, "dtype", "fp32")).strip().lower()
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    shape = str(getattr(args, "shape", "576,1536"))
    parts = shape.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape: expected IN,OUT with positive integers, got {shape!r}")
    in_features, out_features = (int(p) for p in parts)
    rank = _positive_int("--r", getattr(args, "r", 16))
    threads = getattr(args, "threads", None)
    threads = None if threads is None else _positive_int("--threads", threads)
    budget = getattr(args, "budget", 40.0)
    try:
        budget_s = float(budget)
    except (TypeError, ValueError):
        budget_s = math.nan
    if isinstance(budget, bool) or not (math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"--budget: expected a positive number of seconds, got {budget!r}")
    return Options(
        device=torch.device(device),
        dtype=DTYPES[dtype_name],
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        vera_rank=min(VERA_MAX_RANK, in_features, out_features),
        threads=threads,
        budget_s=budget_s,
        json=bool(getattr(args, "json", False)),
    )


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------
class _LogRecords(logging.Handler):
    """Collects what a library logs while it is imported (bitsandbytes warns on CPUs with AVX512-BF16
    that its packed kernel cannot be downloaded), so it becomes a note rather than a stray line."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # the first clause: "Failed to load CPU gemm_4bit_forward from kernels-community: <why>. Please ..."
        first = record.getMessage().split(": ", 1)[0].split(". ", 1)[0]
        self.messages.append(f"{record.name.split('.')[0]} (on import): {first}")


def import_peers() -> tuple[dict[str, str], list[str]]:
    """``(missing, notes)``: why each optional package cannot be used (absent ones are not keys),
    and what they logged while importing."""
    missing: dict[str, str] = {}
    handler = _LogRecords()
    root = logging.getLogger()
    root.addHandler(handler)  # with a handler on the root, Python's last-resort one no longer prints to stderr
    try:
        for package in ("bitsandbytes", "peft"):  # peft imports bitsandbytes when it is there
            try:
                __import__(package)
            except ImportError:
                missing[package] = f"pip install {package}"
            except Exception as exc:  # a broken install: say how, do not stop the bench
                missing[package] = f"{package} failed to import: {type(exc).__name__}"
    finally:
        root.removeHandler(handler)
    notes = [_shorten(m) for m in dict.fromkeys(handler.messages)]
    return missing, notes


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def peft_lora_linear(cls, base: nn.Module, rank: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer class ``cls`` around ``base``: adapter "default", no dropout (newer PEFT also
    takes the LoraConfig)."""
    import inspect

    from peft import LoraConfig

    kwargs = dict(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    if "config" in inspect.signature(cls.__init__).parameters:
        kwargs["config"] = LoraConfig(init_lora_weights=True, **kwargs)
    return cls(base, "default", init_lora_weights=True, **kwargs)


def peft_vera_linear(base: nn.Linear, vera_a: torch.Tensor, vera_b: torch.Tensor, rank: int) -> nn.Module:
    """PEFT's VeRA layer around ``base`` (adapter "default", no dropout) over the given projections."""
    import inspect

    from peft import VeraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera.layer import Linear

    projections = BufferDict({"default": vera_a}), BufferDict({"default": vera_b})
    if "config" in inspect.signature(Linear.__init__).parameters:
        return Linear(base, *projections, "default", config=VeraConfig(r=rank, vera_dropout=0.0), r=rank)
    return Linear(base, *projections, "default", r=rank, vera_dropout=0.0)


def bnb_linear4bit(dense32: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (nf4, double quantization) of ``dense32``, quantized on ``device``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(dense32.in_features, dense32.out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")  # fmt: skip
    layer.load_state_dict({"weight": dense32.weight.detach().float().cpu()})
    return layer.to(device).requires_grad_(False)  # .to quantizes


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
@dataclass
class Trio:
    """One case's layers: the dense baseline, lowrank's, and the peer (None, with the reason)."""

    linear: nn.Module
    lowrank: nn.Module
    peer: Optional[nn.Module]
    peer_missing: Optional[str]


def build_cases(opts: Options, missing: dict[str, str]) -> dict[tuple[str, str], Trio]:
    """``{(case, mode): Trio}``, every layer over one random weight. lowrank's layers and nn.Linear
    serve both passes (each timed call sets the mode); the peers are built per pass."""
    import lowrank

    device, dtype, rank, alpha = opts.device, opts.dtype, opts.rank, 2.0 * opts.rank
    torch.manual_seed(0)
    dense32 = nn.Linear(opts.in_features, opts.out_features, bias=False).requires_grad_(False).to(device)
    dense = nn.Linear(opts.in_features, opts.out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(dense32.weight)

    def peer_or_reason(case: str, build: Callable[[], nn.Module]) -> tuple[Optional[nn.Module], Optional[str]]:
        absent = [missing[p] for p in PEER_PACKAGES[case] if p in missing]
        installs = [a.removeprefix("pip install ") for a in absent if a.startswith("pip install ")]
        if absent and len(installs) == len(absent):
            return None, f"n/a (pip install {' '.join(installs)})"
        if absent:  # one failed to import
            return None, f"n/a ({absent[0]})"
        try:
            return build(), None
        except Exception as exc:  # e.g. a bitsandbytes build without this device's backend
            return None, f"n/a ({_shorten(f'{type(exc).__name__}: {exc}', 70)})"

    lora = lowrank.LoRALinear.from_linear(dense, r=rank, alpha=alpha)
    with torch.no_grad():
        lora.lora_B.weight.normal_(0.0, LORA_B_STD)

    def peft_lora():
        from peft.tuners.lora.layer import Linear

        layer = peft_lora_linear(Linear, dense, rank, alpha).to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora.lora_A.weight)
            layer.lora_B["default"].weight.copy_(lora.lora_B.weight)
        return layer

    vera_a, vera_b = lowrank.vera_shared_projections(opts.vera_rank, opts.in_features, opts.out_features,
                                                     dtype=dtype, device=device)  # fmt: skip
    vera = lowrank.VeRALinear.from_linear(dense, r=opts.vera_rank, projections=(vera_a, vera_b))
    with torch.no_grad():
        vera.vera_lambda_d.normal_(VERA_D_MEAN, VERA_D_STD)
        vera.vera_lambda_b.normal_(0.0, VERA_B_STD)

    def peft_vera():
        layer = peft_vera_linear(dense, vera_a, vera_b, opts.vera_rank).to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(vera.vera_lambda_d)
            layer.vera_lambda_b["default"].copy_(vera.vera_lambda_b)
        return layer

    nf4 = lowrank.NF4Linear.from_linear(dense32, compute_dtype=dtype)
    qlora = lowrank.QLoRALinear.from_linear(dense32, r=rank, alpha=alpha, compute_dtype=dtype)
    with torch.no_grad():
        qlora.lora_B.weight.normal_(0.0, LORA_B_STD)

    def peft_qlora(base4: nn.Module) -> nn.Module:
        from peft.tuners.lora.bnb import Linear4bit

        layer = peft_lora_linear(Linear4bit, base4, rank, alpha)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(qlora.lora_A.weight)
            layer.lora_B["default"].weight.copy_(qlora.lora_B.weight)
        return layer

    lora_peer, vera_peer = peer_or_reason("LoRA", peft_lora), peer_or_reason("VeRA", peft_vera)
    cases: dict[tuple[str, str], Trio] = {}
    for mode in MODES:
        # bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel on the first eval-mode
        # call and cannot backpropagate through it afterwards: each pass gets its own Linear4bit
        base4, base4_missing = peer_or_reason("NF4", lambda: bnb_linear4bit(dense32, dtype, device))
        if base4 is None and "bitsandbytes" not in missing:  # installed, but it failed on this device
            qlora_peer = (None, base4_missing)
        else:
            qlora_peer = peer_or_reason("QLoRA", lambda: peft_qlora(base4))
        cases["LoRA", mode] = Trio(dense, lora, *lora_peer)
        cases["VeRA", mode] = Trio(dense, vera, *vera_peer)
        cases["NF4", mode] = Trio(dense, nf4, base4, base4_missing)
        cases["QLoRA", mode] = Trio(dense, qlora, *qlora_peer)
    return cases


def layer_call(layer: nn.Module, mode: str, tokens: int, in_features: int, out_features: int, dtype: torch.dtype,
               device="cpu") -> Callable[[], object]:  # fmt: skip
    """What one timed call of ``layer`` does (inputs made once, outside the timing; shared with
    ``benchmarks/``). ``forward``: eval mode, under ``torch.no_grad()``. ``forward_backward``: forward,
    then ``torch.autograd.grad`` of y against a fixed random grad_y for x and the trainable parameters,
    returned rather than accumulated, so every call does the same work. The parameters are taken in
    name order with PEFT's ``.default`` dropped, so peers' gradients line up for comparison."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
    if mode == "forward":
        layer.eval()

        def forward():
            with torch.no_grad():
                return layer(x)

        return forward

    layer.train()
    x.requires_grad_(True)
    grad_y = torch.randn(tokens, out_features, generator=generator).to(device, dtype)
    trainable = {name.replace(".default", ""): p for name, p in layer.named_parameters() if p.requires_grad}
    inputs = [x] + [trainable[name] for name in sorted(trainable)]

    def forward_backward():
        return torch.autograd.grad(layer(x), inputs, grad_y)

    return forward_backward


def timed_call(layer: nn.Module, mode: str, tokens: int, opts: Options) -> Callable[[], object]:
    return layer_call(layer, mode, tokens, opts.in_features, opts.out_features, opts.dtype, opts.device)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def warm_up(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Calls ``fn`` WARMUP_CALLS times; returns the last call's seconds (the per-call estimate)."""
    seconds = 0.0
    for _ in range(WARMUP_CALLS):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds = time.perf_counter() - start
    return seconds


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, sync: Optional[Callable[[], None]] = None,
                        collect: bool = True) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each fn, timed round-robin: every round calls each fn once (shared
    with ``benchmarks/``).

    The starting fn rotates from round to round, so no peer always runs right after the same
    neighbour (whose cache footprint or clock boost it would inherit). The garbage collector is off
    while timing; ``collect`` runs one full collection first (after importing PEFT and bitsandbytes
    one takes 0.2 s: :func:`time_rows` collects once, before its first row). ``sync`` (CUDA) runs
    before and after each call. Warm the fns up first.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    sync = sync or (lambda: None)
    if collect:
        gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                sync()
                start = time.perf_counter()
                fn()
                sync()
                samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(times) for name, times in samples.items()}


@dataclass
class Row:
    case: str  # LoRA, VeRA, NF4, QLoRA
    label: str  # what the table shows: "LoRA r=16"
    rank: Optional[int]
    mode: str  # forward, forward_backward
    tokens: int
    peer: str  # the peer's name
    linear_s: float
    lowrank_s: float
    peer_s: Optional[float]
    peer_missing: Optional[str]
    rounds: int

    def as_json(self) -> dict:
        return {
            "case": self.case,
            "label": self.label,
            "rank": self.rank,
            "mode": self.mode,
            "M": self.tokens,
            "peer": self.peer,
            "nn_linear_ms": self.linear_s * 1e3,
            "lowrank_ms": self.lowrank_s * 1e3,
            "peer_ms": None if self.peer_s is None else self.peer_s * 1e3,
            "peer_missing": self.peer_missing,
            "lowrank_over_nn_linear": self.lowrank_s / self.linear_s,
            "lowrank_over_peer": None if self.peer_s is None else self.lowrank_s / self.peer_s,
            "rounds": self.rounds,
        }


def row_plan() -> list[tuple[str, str, int]]:
    """``(case, mode, M)`` for every row, in table order."""
    plan = []
    for case in CASES:
        plan += [(case, "forward", m) for m in TOKENS]
        plan.append((case, "forward_backward", BACKWARD_TOKENS))
    return plan


def case_label(case: str, opts: Options) -> tuple[str, Optional[int]]:
    rank = {"LoRA": opts.rank, "QLoRA": opts.rank, "VeRA": opts.vera_rank}.get(case)
    return (case if rank is None else f"{case} r={rank}"), rank


def time_rows(opts: Options, cases: dict[tuple[str, str], Trio], deadline: float,
              progress: Callable[[str], None]) -> list[Row]:  # fmt: skip
    """Every row of :func:`row_plan`, its rounds sized so the run ends near ``deadline``."""
    sync = _synchronizer(opts.device)
    plan = row_plan()
    gc.collect()
    rows = []
    for index, (case, mode, tokens) in enumerate(plan):
        label, rank = case_label(case, opts)
        progress(f"{label}, M={tokens}, {_PASS[mode]} ({index + 1}/{len(plan)})")
        row_budget = max(0.0, (deadline - time.perf_counter()) / (len(plan) - index))
        started = time.perf_counter()
        trio = cases[case, mode]
        layers = {"nn.Linear": trio.linear, "lowrank": trio.lowrank}
        if trio.peer is not None:
            layers["peer"] = trio.peer
        fns = {name: timed_call(layer, mode, tokens, opts) for name, layer in layers.items()}
        estimates, peer_missing = {}, trio.peer_missing
        for name, fn in fns.items():
            try:
                estimates[name] = warm_up(fn, sync)
            except Exception as exc:  # a peer that fails here is left out, with the reason; lowrank's error is raised
                if name != "peer":
                    raise
                peer_missing = f"n/a ({_shorten(f'{type(exc).__name__}: {exc}', 70)})"
        fns = {name: fn for name, fn in fns.items() if name in estimates}
        per_round = sum(estimates.values())
        left = row_budget - (time.perf_counter() - started)
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(left / max(per_round, 1e-9))))
        medians = interleaved_medians(fns, rounds, sync, collect=False)
        rows.append(Row(case, label, rank, mode, tokens, PEER_NAMES[case], medians["nn.Linear"], medians["lowrank"],
                        medians.get("peer"), peer_missing, rounds))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# lowrank's measured code paths
# ---------------------------------------------------------------------------------------------
def measure_code_paths(device: torch.device) -> tuple[Optional[str], float]:
    """Takes lowrank's CPU code-path decisions this machine has not measured yet (~8 s for all of them
    on a 2-core Zen 4, then cached on disk), so the table times what lowrank runs in use rather than
    built-in defaults (those ran bf16 layers 4-5x slower on the same Zen 4). Returns a note saying
    where the decisions came from (None on CUDA) and the seconds spent measuring."""
    from .ops import _dispatch

    if device.type != "cpu":
        return None, 0.0
    how = _dispatch.mode()
    if how == "off":
        return "lowrank CPU code paths: built-in defaults (LOWRANK_CALIBRATION=off)", 0.0
    known = _dispatch.report(include_disk=True)
    missing = [name for name in _dispatch.DEFAULTS if name not in known]
    if not missing:
        return "lowrank CPU code paths: measured on this machine (disk cache)", 0.0
    start = time.perf_counter()
    _dispatch.calibrate(missing)
    seconds = time.perf_counter() - start
    where = "cached on disk for later runs" if how == "disk" else "not cached: LOWRANK_CALIBRATION=process"
    return (f"lowrank CPU code paths: {len(missing)} of {len(_dispatch.DEFAULTS)} measured now, before the rows "
            f"({seconds:.1f} s, {where}; `python -m lowrank info` shows them)"), seconds  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
_PASS = {"forward": "fwd", "forward_backward": "fwd+bwd"}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
COLUMNS = ("case", "pass", "M", "nn.Linear ms", "lowrank ms", "peer", "peer ms", "lowrank ÷ nn.Linear",
           "lowrank ÷ peer", "rounds")  # fmt: skip


def machine(opts: Options) -> dict:
    from . import _C
    from ._info import cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_kernel_variant": _C.cpu_isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": _DTYPE_NAMES[opts.dtype],
        "device": opts.device.type,
        "gpu": torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else None,
        "shape": [opts.in_features, opts.out_features],
    }


def machine_line(m: dict) -> str:
    """The table's first line: GPU (if any), CPU model, lowrank's CPU kernel variant, threads, torch, dtype."""
    gpu = f"{m['gpu']} (cuda), host " if m["gpu"] else ""
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    return (f"{gpu}{m['cpu']} | lowrank CPU kernels: {m['cpu_kernel_variant']} | {threads} | torch {m['torch']} | "
            f"{m['dtype']} | {m['shape'][0]}x{m['shape'][1]}")  # fmt: skip


def format_ms(seconds: Optional[float]) -> str:
    """Milliseconds to three significant digits, without exponents (1040, 26.9, 0.0213)."""
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def format_ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def table_cells(row: Row) -> tuple[str, ...]:
    if row.peer_s is not None:
        peer_ms = format_ms(row.peer_s)
    else:  # "n/a (pip install peft)" fits; why a peer failed is a note (peer_failure_notes)
        peer_ms = row.peer_missing if _is_install_hint(row.peer_missing) else "n/a (failed, see below)"
    return (row.label, _PASS[row.mode], str(row.tokens), format_ms(row.linear_s), format_ms(row.lowrank_s), row.peer,
            peer_ms, format_ratio(row.lowrank_s, row.linear_s), format_ratio(row.lowrank_s, row.peer_s),
            str(row.rounds))  # fmt: skip


def _is_install_hint(reason: Optional[str]) -> bool:
    return str(reason).startswith("n/a (pip install ")


def peer_failure_notes(rows: list[Row]) -> list[str]:
    """One note per peer and reason it failed for (not a missing package), naming the rows."""
    where: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row.peer_s is None and not _is_install_hint(row.peer_missing):
            reason = str(row.peer_missing).removeprefix("n/a (").removesuffix(")")
            where.setdefault((row.peer, reason), []).append(f"{row.case} {_PASS[row.mode]}")
    return [f"{peer} failed ({', '.join(dict.fromkeys(rows_))}): {reason}" for (peer, reason), rows_ in where.items()]


def render_plain(title: str, rows: list[Row], notes: list[str]) -> str:
    cells = [COLUMNS] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values):
        return "  ".join(v.ljust(w) if i < 2 or i == 5 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [title, line(COLUMNS), "  ".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]
    return "\n".join(out + notes) + "\n"


def print_rich(title: str, rows: list[Row], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table()
    for index, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if index in (0, 1, 5) else "right")
    for index, row in enumerate(rows):
        last_of_case = index + 1 == len(rows) or rows[index + 1].case != row.case
        table.add_row(*table_cells(row), end_section=last_of_case)
    console.print(title, markup=False, highlight=False)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def notes_for(opts: Options, extra: list[str]) -> list[str]:
    notes = [
        "ms: median per call over interleaved rounds. Ratios below 1: lowrank is faster.",
        f"fwd: eval mode, under no_grad. fwd+bwd (M={BACKWARD_TOKENS}): y, then the grads of x and of the trainable "
        "parameters.",
        "peers: PEFT's LoRA / VeRA Linear over the same nn.Linear; bnb: bitsandbytes Linear4bit (nf4, double "
        "quantization);",
        "PEFT+bnb: PEFT's LoRA over that Linear4bit.",
    ]
    if opts.vera_rank < VERA_MAX_RANK:
        notes.append(f"VeRA: r={opts.vera_rank}, the largest rank up to {VERA_MAX_RANK} that fits "
                     f"{opts.in_features}x{opts.out_features} (min(IN, OUT)).")  # fmt: skip
    else:
        notes.append(f"VeRA: r={VERA_MAX_RANK}.")
    weight_bytes = opts.in_features * opts.out_features * opts.dtype.itemsize
    size = f"{weight_bytes / 2**20:.1f} MiB" if weight_bytes >= 2**20 else f"{weight_bytes / 2**10:.0f} KiB"
    notes.append(f"dense weight {size}: warm-cache times where it fits the last-level cache.")
    return notes + extra


def run(args: argparse.Namespace) -> int:
    """Runs ``lowrank bench`` with parsed ``args`` (see :func:`add_arguments`); prints the table (or
    JSON) and returns 0. Bad options raise ValueError naming the option."""
    started = time.perf_counter()
    opts = parse_options(args)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    deadline = started + opts.budget_s
    status = _status(opts)
    try:
        status("importing peers")
        missing, import_notes = import_peers()
        status("measuring lowrank's code paths (once per machine)")
        code_path_note, calibration_s = measure_code_paths(opts.device)
        deadline += calibration_s  # measured once per machine: not the rows' time
        status("building layers")
        cases = build_cases(opts, missing)
        rows = time_rows(opts, cases, deadline, status)
    finally:
        status(None)
    extra = peer_failure_notes(rows) + ([code_path_note] if code_path_note else []) + import_notes
    measuring = f" + {calibration_s:.1f} s measuring code paths" if calibration_s else ""
    extra.append(f"{len(rows)} rows in {time.perf_counter() - started:.1f} s (budget {opts.budget_s:g} s{measuring}).")
    notes = notes_for(opts, extra)
    m = machine(opts)
    if opts.json:
        print(json.dumps({"machine": m, "rows": [row.as_json() for row in rows], "notes": notes}, indent=1))
        return 0
    try:
        import rich  # noqa: F401
    except ImportError:
        sys.stdout.write(render_plain(machine_line(m), rows, notes))
    else:
        print_rich(machine_line(m), rows, notes)
    return 0


def _status(opts: Options) -> Callable[[Optional[str]], None]:
    """A transient one-line status on stderr while timing (rich, on a terminal, not in --json mode);
    call with None to clear it."""
    if opts.json:
        return lambda text: None
    try:
        from rich.console import Console
    except ImportError:
        return lambda text: None
    console = Console(stderr=True)
    if not console.is_terminal:
        return lambda text: None
    spinner = console.status("")
    spinner.start()

    def update(text: Optional[str]) -> None:
        if text is None:
            spinner.stop()
        else:
            spinner.update(f"lowrank bench: {text}")

    return update
