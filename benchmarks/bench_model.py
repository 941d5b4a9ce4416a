"""Whole models, every linear layer adapted: training step, its peak memory, decode and prefill, lowrank
against PEFT (and bitsandbytes) and against the plain model.

Two models built from their configs with seeded random weights (nothing downloaded):

- ``llama``: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads,
  vocab 49152, tied embeddings; benchmarks/bench_adapters.py), 210 ``nn.Linear`` projections;
- ``gpt2``: GPT-2 small (``GPT2Config()``'s defaults: 12 layers, hidden 768, vocab 50257, dropout 0.1
  in training), whose 48 projections are HF ``Conv1D`` layers (``y = x W + b``, ``W:[in, out]``).

"all-linear": every projection but the (tied) output head. Methods (rows), each against its peer:

    LoRA r=16 (alpha 32)     lowrank.LoRAConfig                 PEFT LoraConfig
    VeRA r=256               lowrank.VeRAConfig                 PEFT VeraConfig (same shared projections)
    QLoRA r=16 (alpha 32)    lowrank.QLoRAConfig, every         PEFT LoRA over bitsandbytes Linear4bit
                             projection in NF4                  (nf4, double quantization, fp32 compute)
    full fine-tuning         lowrank.FullConfig                 plain PyTorch: the projections' weights
                                                                (and biases) trainable, nothing else

PEFT runs with ``fan_in_fan_out=True`` on GPT-2's Conv1D, and without ``autocast_adapter_dtype`` (its
default would upcast bf16 adapters to fp32: both peers then hold the same bf16 adapters). GPT-2's
bitsandbytes peer replaces each Conv1D by a Linear4bit of the transposed weight, as transformers'
bitsandbytes loading does. bitsandbytes trains through dequantize + fp32 matmul, but in eval mode on a
CPU with AVX512-BF16 it repacks each weight for its bf16 kernel (x and the scales rounded to bf16), so
its inference rows compute in bf16 there (the table says so). "plain" is the model without adapters:
trained in full (plain PyTorch full fine-tuning, as above) in the training rows, run as it is in the
inference rows.

Metrics (rows of one table per model, ratios of lowrank's time or memory over the peer's and over the
plain model's: below 1, lowrank is faster or smaller):

- train step: forward on 4 x 128 tokens with ``labels`` (HF's loss), backward, ``AdamW.step()`` on the
  trainable parameters, ``zero_grad(set_to_none=True)`` (bench_adapters.step_call), training mode;
  each (model, dtype) case in a fresh process (as the peak memory below), its methods interleaved;
- train step, lowrank.fast_loss (time, and peak memory below): the same step, lowrank's models computing
  their loss with ``lowrank.fast_loss`` (lowrank's cross-entropy kernels: the same fp32 loss without
  transformers' fp32 copies of the logits), in the same interleaved run or set of fresh processes; the
  peers and the plain model keep transformers' loss, so these rows say what a lowrank user gets; and
  the same with ``fast_loss(model, keep_logits=False)``, the output head run inside the loss a chunk
  of rows at a time, so the step never holds the whole logits matrix; and that with the forward under
  ``lowrank.recompute_pointwise`` (saved activations that one pointwise op makes from tensors autograd
  keeps anyway, such as the MLP's act(gate) * up and the norms' outputs, rebuilt in the backward); and
  that with the attention on ``lowrank.fast_attention`` (lowrank's causal attention kernels in place of
  torch's SDPA); and, for the Llama, that with its RMSNorms and its MLPs' SiLU products on
  ``lowrank.fast_norm`` and ``lowrank.fast_swiglu``;
- train step under autocast: the fp32 models' step with the forward and loss under
  ``torch.autocast("cpu", torch.bfloat16)`` (the backward and AdamW outside it), every method against its
  peer, in a fresh process per model (``test_train_step_autocast``): mixed precision as transformers'
  Trainer with ``bf16=True`` runs it on a CPU;
- train step peak (fp32 only; bf16 halves what is stored): the step's peak resident memory (VmHWM)
  above the baseline, the model included, each method in a fresh process forked from a server that
  has only imported the libraries (so no process pays peft's 6 s import): after a tiny warm-up step of
  the same method, the counter reset once the model is built, every allocation of 64 KiB or more its
  own mmap so freed memory leaves at once (as benchmarks/_memory_step.py: the memory in use, not
  what glibc's adaptive heap kept, which made the same step read up to 1.34x more in one process
  than another);
- train step peak under autocast (``test_train_step_autocast_memory``): the reading above for the
  step under autocast, every method against its peer (``F.linear`` under autocast keeps a bf16 copy
  of each W until the backward; lowrank's layers keep none of a frozen one);
- decode: greedy ``generate`` of 32 new tokens after a 16-token prompt, batch 1, eval, ``no_grad``,
  reported per new token (the prompt's prefill, about one decode step's cost, is in the time); and the
  same for a batch of 8 (each layer call then has 8 tokens), for the methods without their variants;
- prefill: one forward of 1 x 512 tokens, eval, ``no_grad``, logits of the last position only
  (``logits_to_keep=1``, as ``generate`` prefills), reported in tokens/s (its ratios are of time);
  decode and prefill also for each lowrank model with ``lowrank.fast_attention`` (and, for the Llama, that
  with ``fast_norm`` and ``fast_swiglu``), in the same runs.

Each timed metric runs all its methods interleaved (A, B, C, A, B, C, ...; benchmarks/_timing.py)
after one warm-up call each, so the ratios hold through this machine's slow phases; every call here
takes seconds, so the rounds are MIN_ROUNDS (3). fp32 for every row; bf16 for LoRA and plain. The
``test_peers_compute_the_same_model`` tests (first in the file) check, on tiny models, that each peer
trains the same parameters and computes the same logits as lowrank given the same values.

Time on this 2-core Zen 4: 18 minutes for everything (measured 2026-12-05, four variants of each
lowrank method in the training rows; training steps 2.0-3.3 s fp32 and 1.1-1.6 s bf16, a 32-token
generate 1.7-2.6 s, a 512-token prefill 0.5-1.7 s, a memory process 4-7 s; each interleaved case is
one warm-up call and 3 rounds). A fifth variant since 2026-12-06 (with lowrank.fast_attention): ``-k llama``
took 7.6 minutes on a Zen 5; with the Llama's sixth (fast_norm + fast_swiglu), its training, decode and
prefill rows (``-k "llama and (test_train_step[ or decode or prefill)"``) took 6.7 minutes there. The
batched-decode rows (``-k "decode_batch and llama"``, since 2026-12-06) took 3.7 minutes on a Zen 4; the
autocast training rows of both models (``-k "test_train_step_autocast and not memory"``, since 2026-12-07)
3.4 minutes, their peak-memory rows (``-k test_train_step_autocast_memory``, 16 fresh processes) 1.6.

    pytest benchmarks/bench_model.py -s                                  # everything
    pytest benchmarks/bench_model.py -s -k llama                         # one model
    pytest benchmarks/bench_model.py -s -k "fp32 and not memory"         # fp32 timings only
    pytest benchmarks/bench_model.py -s -k "decode or prefill"           # inference
    pytest benchmarks/bench_model.py -s -k "test_train_step and llama-fp32"   # one timed case (~2 min)
    pytest benchmarks/bench_model.py -s -k test_train_step_autocast      # mixed precision (~5 min)
    pytest benchmarks/bench_model.py -k same                             # the peers' checks
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_model.py -q            # CI: 2 layers, hidden 64, each call once

transformers is required (the file is skipped without it); PEFT and bitsandbytes are optional (their
columns read "—").
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing
import multiprocessing.forkserver
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import lowrank

from ._memory_step import _reset_peak, _status_kb, fixed_allocator
from ._peers import available
from ._report import cpu_name, dtype_label, format_ms, format_ratio
from ._timing import QUICK, interleaved_medians, interleaved_rounds_warmed_once
from .bench_adapters import SMOLLM2_135M, llama, step_call, token_ids, tokens_label
from .bench_adapters import TINY as TINY_LLAMA

transformers = pytest.importorskip("transformers")

# GPT2Config()'s defaults, the parts that shape the compute.
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
TINY = {
    "llama": TINY_LLAMA,  # 2 layers, hidden 64
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=1,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # no dropout: train-mode logits compare
}  # fmt: skip
FULL = {"llama": SMOLLM2_135M, "gpt2": GPT2_SMALL}
ARCHS = ("llama", "gpt2")
DTYPES = (torch.float32, torch.bfloat16)

STEP_TOKENS = (2, 16) if QUICK else (4, 128)  # (batch, sequence) of a training step
PROMPT_TOKENS, NEW_TOKENS = (8, 4) if QUICK else (16, 32)  # decode: batch 1
DECODE_BATCH = 2 if QUICK else 8  # batched decode: each layer call has this many tokens
PREFILL_TOKENS = (1, 32) if QUICK else (1, 512)
MEMORY_TIMEOUT_S = 600.0  # one method's fresh process (build, warm-up step, measured step): 4-7 s at full size
TRAIN_TIMEOUT_S = 1800.0  # one case's training steps, every method interleaved: ~3-5 min at full size

RANK, ALPHA, VERA_RANK = 16, 32, 256


def shape(arch: str, tiny: bool = QUICK) -> dict:
    return TINY[arch] if tiny else FULL[arch]


def arch_label(arch: str, tiny: bool = QUICK) -> str:
    s = shape(arch, tiny)
    if arch == "llama":
        name = "tiny Llama" if tiny else "Llama of SmolLM2-135M's shape"
        return f"{name} ({s['num_hidden_layers']} layers, hidden {s['hidden_size']})"
    name = "tiny GPT-2" if tiny else "GPT-2 small"
    return f"{name} ({s['n_layer']} layers, hidden {s['n_embd']}, Conv1D projections)"


def base_model(arch: str, dtype: torch.dtype, tiny: bool = QUICK) -> nn.Module:
    """The model without adapters, seeded random weights, in ``dtype``, eval mode."""
    if arch == "llama":
        model = llama(shape(arch, tiny))
    elif arch == "gpt2":
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape(arch, tiny)))
    else:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Methods: lowrank's and their peers', each built over a base model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """A lowrank method and the peer it is compared with."""

    label: str
    mine: str
    peer: str
    peer_label: str
    dtypes: tuple = (torch.float32,)

    def __str__(self) -> str:
        return self.mine


ROWS = (
    Row(f"LoRA r={RANK}", "lora", "peft-lora", "PEFT", DTYPES),
    Row(f"VeRA r={VERA_RANK}", "vera", "peft-vera", "PEFT"),
    Row(f"QLoRA r={RANK}", "qlora", "peft-qlora", "PEFT+bnb", DTYPES),
    Row("full fine-tuning", "full", "plain-full", "plain PyTorch"),
)
PLAIN_TRAIN, PLAIN_INFERENCE = "plain-full", "plain"


def needs(method: str) -> tuple[str, ...]:
    return {"peft-lora": ("peft",), "peft-vera": ("peft",), "peft-qlora": ("peft", "bitsandbytes")}.get(method, ())


def missing(method: str) -> list[str]:
    return [module for module in needs(method) if not available(module)]


def rows_for(dtype: torch.dtype) -> list[Row]:
    return [row for row in ROWS if dtype in row.dtypes]


def projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of what "all-linear" targets: every ``nn.Linear`` or ``Conv1D`` but ``lm_head``."""
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n != "lm_head"]


def plain_full_finetuning(model: nn.Module) -> nn.Module:
    """Only the projections' weights and biases trainable: what ``FullConfig("all-linear")`` trains."""
    model.requires_grad_(False)
    for _, module in projections(model):
        module.requires_grad_(True)
    return model


def bnb_nf4(model: nn.Module) -> nn.Module:
    """Every projection replaced, in place, by a bitsandbytes ``Linear4bit`` (nf4, double quantization,
    blocksize 64: lowrank's NF4 bytes) computing in the model's dtype. A Conv1D's weight is transposed
    into the Linear's ``[out, in]``, as transformers' bitsandbytes loading does."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    for name, module in projections(model):
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        out_features, in_features = weight.shape
        q = bnb.nn.Linear4bit(in_features, out_features, bias=module.bias is not None, compute_dtype=weight.dtype,
                              compress_statistics=True, quant_type="nf4")  # fmt: skip
        state = {"weight": weight.detach().float()}
        if module.bias is not None:
            state["bias"] = module.bias.detach()
        q.load_state_dict(state)
        q = q.to("cpu").requires_grad_(False)  # .to() quantizes
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, q)
    return model


def peft_model(base: nn.Module, method: str) -> nn.Module:
    import peft

    conv1d = isinstance(base, transformers.GPT2LMHeadModel) and method != "peft-qlora"  # bnb_nf4 made Linears
    if method == "peft-vera":
        config = peft.VeraConfig(r=VERA_RANK, target_modules="all-linear", vera_dropout=0.0, fan_in_fan_out=conv1d)
    else:
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 fan_in_fan_out=conv1d)  # fmt: skip
    if method == "peft-qlora":
        base = bnb_nf4(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, config, autocast_adapter_dtype=False)


LOWRANK_CONFIGS = {
    "lora": lambda: lowrank.LoRAConfig(r=RANK, alpha=ALPHA),
    "vera": lambda: lowrank.VeRAConfig(r=VERA_RANK),
    "qlora": lambda: lowrank.QLoRAConfig(r=RANK, alpha=ALPHA, quantize_base="all-linear"),
    "full": lambda: lowrank.FullConfig(),
}


FAST_LOSS = "+fast-loss"  # a lowrank method's model whose loss runs on lowrank's kernels (lowrank.fast_loss)
FUSED_HEAD = "+fused-head"  # ...and whose output head runs inside the loss (fast_loss(keep_logits=False))
LEAN = "+lean"  # ...and whose forward runs under lowrank.recompute_pointwise
ATTENTION = "+attention"  # a lowrank method's model (any of the above) whose attention runs on lowrank.fast_attention
NORM = "+norm"  # ...and whose RMSNorms and MLP products run on lowrank.fast_norm and lowrank.fast_swiglu


def build(method: str, base: nn.Module) -> nn.Module:
    """``method`` over ``base`` (changed in place; pass a copy to keep it). Eval mode."""
    if method.endswith(NORM):
        return lowrank.fast_swiglu(lowrank.fast_norm(build(method.removesuffix(NORM), base)))
    if method.endswith(ATTENTION):
        return lowrank.fast_attention(build(method.removesuffix(ATTENTION), base))
    if method.endswith(FAST_LOSS):
        return lowrank.fast_loss(build(method.removesuffix(FAST_LOSS), base))
    if method.endswith(LEAN):
        return lowrank.recompute_pointwise(build(method.removesuffix(LEAN) + FUSED_HEAD, base))
    if method.endswith(FUSED_HEAD):
        return lowrank.fast_loss(build(method.removesuffix(FUSED_HEAD), base), keep_logits=False)
    if method in LOWRANK_CONFIGS:
        model = lowrank.inject(base, LOWRANK_CONFIGS[method]())
    elif method.startswith("peft-"):
        model = peft_model(base, method)
    elif method == PLAIN_TRAIN:
        model = plain_full_finetuning(base)
    elif method == PLAIN_INFERENCE:
        model = base
    else:
        raise ValueError(f"method: unknown {method!r}")
    return model.eval()


def methods_for(dtype: torch.dtype, plain: str, training: bool) -> list[str]:
    """The methods a metric runs: lowrank's, their peers (those installed) and the plain model."""
    methods = []
    for row in rows_for(dtype):
        methods.append(row.mine)
        if (training or row.peer != PLAIN_TRAIN) and not missing(row.peer):
            methods.append(row.peer)
    return list(dict.fromkeys(methods + [plain]))


def has_rms_norms(arch: str) -> bool:
    """Whether ``arch``'s norms and MLPs are ones lowrank.fast_norm and fast_swiglu take (Llama's; GPT-2 has
    LayerNorms and a GELU MLP)."""
    return arch == "llama"


def with_fast_loss(methods: list[str], dtype: torch.dtype, arch: str) -> list[str]:
    """``methods`` and, for each lowrank method among them, the same with lowrank's loss (FAST_LOSS), with
    the output head fused into it (FUSED_HEAD), that under recompute_pointwise (LEAN), that with
    lowrank.fast_attention (LEAN + ATTENTION), and that with lowrank.fast_norm and fast_swiglu (+ NORM,
    where the model has what they take)."""
    mine = [row.mine for row in rows_for(dtype) if row.mine in methods]
    suffixes = (FAST_LOSS, FUSED_HEAD, LEAN, LEAN + ATTENTION)
    if has_rms_norms(arch):
        suffixes += (LEAN + ATTENTION + NORM,)
    return methods + [m + suffix for suffix in suffixes for m in mine]


def with_fast_attention(methods: list[str], dtype: torch.dtype, arch: str) -> list[str]:
    """``methods`` and, for each lowrank method among them, the same with lowrank.fast_attention (ATTENTION),
    and that with lowrank.fast_norm and fast_swiglu (+ NORM, where the model has them)."""
    suffixes = (ATTENTION,) + ((ATTENTION + NORM,) if has_rms_norms(arch) else ())
    return methods + [row.mine + suffix for suffix in suffixes for row in rows_for(dtype) if row.mine in methods]


def variant_values(values: dict[str, float], dtype: torch.dtype, suffix: str) -> dict[str, float]:
    """``values`` with each lowrank method's entry taken from its ``suffix`` run (the peers' stay)."""
    return {**values, **{row.mine: values[row.mine + suffix] for row in rows_for(dtype)
                         if row.mine + suffix in values}}  # fmt: skip


def build_all(arch: str, dtype: torch.dtype, methods: list[str]) -> dict[str, nn.Module]:
    base = base_model(arch, dtype)
    return {method: build(method, copy.deepcopy(base)) for method in methods}


# ---------------------------------------------------------------------------------------------
# Timed calls
# ---------------------------------------------------------------------------------------------
def decode_call(model: nn.Module, arch: str, batch: int = 1) -> Callable[[], torch.Tensor]:
    ids = token_ids((batch, PROMPT_TOKENS), shape(arch))
    mask = torch.ones_like(ids)

    def decode():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip

    return decode


def prefill_call(model: nn.Module, arch: str) -> Callable[[], torch.Tensor]:
    ids = token_ids(PREFILL_TOKENS, shape(arch))

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, logits_to_keep=1).logits

    return prefill


# ---------------------------------------------------------------------------------------------
# The table: one per model, its rows in one order (metric, dtype, method) whatever order the tests ran in
# ---------------------------------------------------------------------------------------------
COLUMNS = ("metric", "method (peer)", "dtype", "lowrank", "peer", "plain", "lowrank/peer", "lowrank/plain", "rounds")
METRICS = {
    "train": f"train step {tokens_label(STEP_TOKENS)}, ms",
    "train_fast": f"train step {tokens_label(STEP_TOKENS)}, lowrank.fast_loss, ms",
    "train_fused": f"train step {tokens_label(STEP_TOKENS)}, fast_loss(keep_logits=False), ms",
    "train_lean": f"train step {tokens_label(STEP_TOKENS)}, keep_logits=False + recompute_pointwise, ms",
    "train_attention": f"train step {tokens_label(STEP_TOKENS)}, that + lowrank.fast_attention, ms",
    "train_norm": f"train step {tokens_label(STEP_TOKENS)}, that + fast_norm + fast_swiglu, ms",
    "train_autocast": f"train step {tokens_label(STEP_TOKENS)}, forward under torch.autocast(bf16), ms",
    "memory": f"train step {tokens_label(STEP_TOKENS)} peak, MB",
    "memory_fast": f"train step {tokens_label(STEP_TOKENS)} peak, lowrank.fast_loss, MB",
    "memory_fused": f"train step {tokens_label(STEP_TOKENS)} peak, fast_loss(keep_logits=False), MB",
    "memory_lean": f"train step {tokens_label(STEP_TOKENS)} peak, keep_logits=False + recompute_pointwise, MB",
    "memory_attention": f"train step {tokens_label(STEP_TOKENS)} peak, that + lowrank.fast_attention, MB",
    "memory_norm": f"train step {tokens_label(STEP_TOKENS)} peak, that + fast_norm + fast_swiglu, MB",
    "memory_autocast": f"train step {tokens_label(STEP_TOKENS)} peak, forward under torch.autocast(bf16), MB",
    "decode": f"decode {PROMPT_TOKENS}+{NEW_TOKENS}, ms/token",
    "decode_attention": f"decode {PROMPT_TOKENS}+{NEW_TOKENS}, lowrank.fast_attention, ms/token",
    "decode_norm": f"decode {PROMPT_TOKENS}+{NEW_TOKENS}, that + fast_norm + fast_swiglu, ms/token",
    "decode_batch": f"decode {DECODE_BATCH} x {PROMPT_TOKENS}+{NEW_TOKENS}, ms/token (all {DECODE_BATCH})",
    "prefill": f"prefill {tokens_label(PREFILL_TOKENS)}, tokens/s",
    "prefill_attention": f"prefill {tokens_label(PREFILL_TOKENS)}, lowrank.fast_attention, tokens/s",
    "prefill_norm": f"prefill {tokens_label(PREFILL_TOKENS)}, that + fast_norm + fast_swiglu, tokens/s",
}


def model_table(summary_tables, arch: str):
    table = summary_tables.table(
        f"Whole model, {arch_label(arch)}, every linear layer adapted; {torch.get_num_threads()} threads on "
        f"{cpu_name()}: interleaved medians",
        COLUMNS,
    )
    if not table.notes:
        table.notes += [
            "lowrank/peer, lowrank/plain: lowrank's time (prefill too) or memory over the other's; below 1, lowrank "
            "is faster or smaller",
            "plain: the model without adapters; in the train rows trained in full by plain PyTorch (the "
            "projections' weights and biases)",
            "peak MB: one step in a fresh process per method, above the process's baseline (the model included)",
            "lowrank.fast_loss rows: lowrank's models compute their loss on lowrank's cross-entropy kernels, the "
            "peers and the plain model on transformers' (the same runs as the rows above them, interleaved); "
            "keep_logits=False: the output head runs inside the loss, a chunk of rows at a time; + recompute_pointwise: "
            "saved activations one pointwise op makes from tensors autograd keeps anyway are rebuilt in the backward; "
            "lowrank.fast_attention: lowrank's models run their attention on lowrank's kernels, the others on "
            "torch's SDPA (GPT-2's attention dropout in training goes to SDPA either way); fast_norm + fast_swiglu: "
            "and their RMSNorms and gated MLPs' SiLU products on lowrank's kernels (Llama; GPT-2 has LayerNorms "
            "and a GELU MLP)",
        ]
    return table


def display(metric: str, value: Optional[float]) -> str:
    if value is None:
        return "—"
    if metric.startswith("memory"):
        return f"{value:.0f}"
    if metric.startswith("decode"):
        return format_ms(value / NEW_TOKENS)
    if metric.startswith("prefill"):
        return f"{PREFILL_TOKENS[0] * PREFILL_TOKENS[1] / value:.0f}"
    return format_ms(value)


def _row_order(cells: tuple[str, ...]) -> tuple[int, int, int]:
    metric, method, dtype = cells[:3]
    methods = [i for i, row in enumerate(ROWS) if method.startswith(row.label)]
    return list(METRICS.values()).index(metric), [dtype_label(d) for d in DTYPES].index(dtype), methods[0]


def add_rows(table, metric: str, dtype: torch.dtype, values: dict[str, float], plain: str, rounds: str) -> None:
    """One row per method of ``dtype``: lowrank, its peer (none for full fine-tuning at inference, where
    plain PyTorch's model is the plain model) and the plain model."""
    for row in rows_for(dtype):
        has_peer = row.peer != PLAIN_TRAIN or metric.startswith(("train", "memory"))
        mine, peer, base = values.get(row.mine), values.get(row.peer) if has_peer else None, values.get(plain)
        table.add_row(METRICS[metric], f"{row.label} ({row.peer_label})" if has_peer else row.label, dtype_label(dtype),
                      display(metric, mine), display(metric, peer), display(metric, base), format_ratio(mine, peer),
                      format_ratio(mine, base), rounds)  # fmt: skip
        absent = missing(row.peer) if has_peer else []
        if absent:
            _note(table, f"{row.label}: {row.peer_label} not run ({', '.join(absent)} not installed)")
    table.rows.sort(key=_row_order)
    if metric.startswith(("decode", "prefill")) and "peft-qlora" in values and _bnb_packed_bf16_kernel():
        _note(table, "PEFT+bnb at inference (eval, no_grad): bitsandbytes' packed kernel for AVX512-BF16 CPUs, which "
                     "rounds x and the scales to bf16; in training it dequantizes and multiplies in fp32")


def _note(table, note: str) -> None:
    if note not in table.notes:
        table.notes.append(note)


def _bnb_packed_bf16_kernel() -> bool:
    """Whether bitsandbytes' Linear4bit runs eval-mode forwards through its bf16 CPU kernel here."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


CASES = [(arch, dtype) for arch in ARCHS for dtype in DTYPES]


def case_id(case) -> str:
    arch, dtype = case
    return f"{arch}-{dtype_label(dtype)}"


# ---------------------------------------------------------------------------------------------
# The peers compute the same model
# ---------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    """A trainable parameter's name with the peer's wrapping dropped: lowrank's
    ``X.adapters.default.lora_A.weight``, PEFT's ``base_model.model.X.lora_A.default.weight`` and a
    plain model's ``X.weight`` (full fine-tuning) all become ``X.lora_A.weight`` / ``X.weight``."""
    return name.removeprefix("base_model.model.").replace(".adapters.default", "").replace(".default", "")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_key(n): p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def randomize_and_copy(mine: nn.Module, peer: nn.Module) -> None:
    """Gives lowrank's trainable parameters random values that change the model (LoRA's B is zero at
    init, VeRA's lambda_b too, full fine-tuning starts at W0) and copies them into the peer's."""
    generator = torch.Generator().manual_seed(5)
    ours, theirs = trainable(mine), trainable(peer)
    assert sorted(ours) == sorted(theirs)
    for name, p in ours.items():
        noise = torch.randn(p.shape, generator=generator).to(p.dtype)
        if name.endswith(("vera_lambda_b", "vera_lambda_d")):
            p.copy_(0.1 + 0.05 * noise)
        elif "lora_" in name:
            p.copy_(0.05 * noise)
        else:  # full fine-tuning: W0 + ΔW
            p.add_(0.02 * noise)
        theirs[name].copy_(p)


def reference(mine: nn.Module) -> nn.Module:
    """The model both peers compute, in float64: every adapter merged into its base weight (a 4-bit base
    decoded exactly first)."""
    ref = copy.deepcopy(mine)
    if not any(layer.kind == "nf4" for _, layer in lowrank.adapted_layers(ref)):
        ref = ref.double()  # the merge then rounds nothing a bf16 or fp32 model computes
    return lowrank.merge_and_unload(ref).double()


ROW_DTYPES = [pytest.param(row, dtype, id=f"{row}-{dtype_label(dtype)}") for row in ROWS for dtype in row.dtypes]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("row, dtype", ROW_DTYPES)
def test_peers_compute_the_same_model(arch: str, row: Row, dtype: torch.dtype):
    """Same trainable parameters (names and shapes), and the same logits given the same values, in
    training mode (the train step's path) and in eval mode (decode's and prefill's)."""
    for module in missing(row.peer):
        pytest.skip(f"{module} is not installed")
    base = base_model(arch, dtype, tiny=True)
    mine, peer = build(row.mine, copy.deepcopy(base)), build(row.peer, copy.deepcopy(base))
    assert {n: p.shape for n, p in trainable(mine).items()} == {n: p.shape for n, p in trainable(peer).items()}
    randomize_and_copy(mine, peer)
    ids = token_ids((2, 12), shape(arch, tiny=True))
    errors = {}
    with torch.no_grad():
        expected = reference(mine)(input_ids=ids).logits
        scale = expected.abs().max().item()
        errors["no adapter"] = (base(input_ids=ids).logits.double() - expected).abs().max().item() / scale
        # training mode first: bitsandbytes repacks its weights for its bf16 kernel at the first eval forward
        for mode in ("train", "eval"):
            for name, model in (("lowrank", mine), ("peer", peer)):
                logits = model.train(mode == "train")(input_ids=ids).logits
                errors[f"{name} {mode}"] = (logits.double() - expected).abs().max().item() / scale
    # Within a few roundings of the dtype (the tiny model's logits go through 2 layers: measured at
    # most 3.4 eps in fp32 and bf16), where dropping the adapters is off by over 100 eps. bitsandbytes in
    # eval mode on a CPU with AVX512-BF16 runs its packed kernel, which rounds x and the scales to bf16
    # (measured 0.5 bf16 eps).
    tolerance = 8 * torch.finfo(dtype).eps
    bf16_kernel = 4 * torch.finfo(torch.bfloat16).eps
    for name, error in errors.items():
        if name == "no adapter":
            assert error > 10 * tolerance, errors
        else:
            assert error <= (bf16_kernel if name == "peer eval" and row.peer == "peft-qlora" else tolerance), errors


# ---------------------------------------------------------------------------------------------
# Training step: time, then peak memory
# ---------------------------------------------------------------------------------------------
def train_medians(arch: str, dtype: torch.dtype) -> tuple[dict[str, float], int]:
    """Every training method of one case, its steps interleaved, in this (fresh) process: the medians
    (seconds) and the rounds."""
    methods = with_fast_loss(methods_for(dtype, PLAIN_TRAIN, training=True), dtype, arch)
    models = build_all(arch, dtype, methods)
    calls = {m: step_call(model.train(), STEP_TOKENS, shape(arch)) for m, model in models.items()}
    rounds = interleaved_rounds_warmed_once(calls)
    return interleaved_medians(calls, rounds), rounds


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train_step(case, summary_tables):
    """Each case in a process of its own (forked from the server that has only imported the libraries,
    as the memory rows): with glibc's default allocator a step's time depends on what the process
    allocated and freed before (PEFT's bf16 LoRA step took 1348 ms after the rest of the suite had run
    in the process and 1949-1984 ms in a fresh one, lowrank's with the fused head 1448 and 1456 ms), so
    a case's rows do not depend on which cases ran before it."""
    arch, dtype = case
    median, rounds = in_fresh_process(train_medians, arch, dtype, timeout_s=TRAIN_TIMEOUT_S)
    table = model_table(summary_tables, arch)
    add_rows(table, "train", dtype, median, PLAIN_TRAIN, str(rounds))
    add_rows(table, "train_fast", dtype, variant_values(median, dtype, FAST_LOSS), PLAIN_TRAIN, str(rounds))
    add_rows(table, "train_fused", dtype, variant_values(median, dtype, FUSED_HEAD), PLAIN_TRAIN, str(rounds))
    add_rows(table, "train_lean", dtype, variant_values(median, dtype, LEAN), PLAIN_TRAIN, str(rounds))
    add_rows(table, "train_attention", dtype, variant_values(median, dtype, LEAN + ATTENTION), PLAIN_TRAIN, str(rounds))
    if has_rms_norms(arch):
        add_rows(table, "train_norm", dtype, variant_values(median, dtype, LEAN + ATTENTION + NORM), PLAIN_TRAIN,
                 str(rounds))  # fmt: skip


def autocast_step_call(model: nn.Module, arch: str) -> Callable[[], torch.Tensor]:
    """:func:`step_call`'s training step with the forward and loss under ``torch.autocast("cpu", bf16)``
    (the backward and the optimizer outside it): an fp32 model trained in mixed precision, as
    transformers' Trainer with ``bf16=True`` runs one on a CPU."""
    step = step_call(model, STEP_TOKENS, shape(arch))
    autocast_forward(model)
    return step


def autocast_forward(model: nn.Module) -> None:
    """``model``'s forward (and so the loss it computes) run under ``torch.autocast("cpu", bf16)`` from now on."""
    forward = model.forward

    def forward_under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast


def train_autocast_medians(arch: str) -> tuple[dict[str, float], int]:
    """:func:`train_medians` for fp32 models whose forward runs under autocast (bf16)."""
    models = build_all(arch, torch.float32, methods_for(torch.float32, PLAIN_TRAIN, training=True))
    calls = {m: autocast_step_call(model.train(), arch) for m, model in models.items()}
    rounds = interleaved_rounds_warmed_once(calls)
    return interleaved_medians(calls, rounds), rounds


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_autocast(arch, summary_tables):
    """The fp32 training step under autocast, every method against its peer, in a process of its own
    (as :func:`test_train_step`)."""
    median, rounds = in_fresh_process(train_autocast_medians, arch, timeout_s=TRAIN_TIMEOUT_S)
    add_rows(model_table(summary_tables, arch), "train_autocast", torch.float32, median, PLAIN_TRAIN, str(rounds))


def step_memory(arch: str, method: str, dtype: torch.dtype, tiny: bool, autocast: bool = False) -> dict:
    """One training step of ``method`` in this (fresh) process: its peak resident memory above the
    baseline, in MB (see benchmarks/_memory_step.py: large allocations are each their own mmap here, so
    the reading is memory in use, not what glibc's heap kept). ``autocast``: the step of
    :func:`autocast_step_call` (an fp32 model, its forward under autocast)."""
    fixed_allocator()

    def step_of(model, tokens, tiny_shape):
        step = step_call(model, tokens, shape(arch, tiny_shape))
        if autocast:
            autocast_forward(model)
        return step

    # a tiny step of the same method first: code pages, thread pools, caches go into the baseline
    step_of(build(method, base_model(arch, dtype, tiny=True)).train(), (2, 8), True)()
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    model = build(method, base_model(arch, dtype, tiny)).train()
    step = step_of(model, STEP_TOKENS, tiny)
    gc.collect()
    model_kb = _status_kb("VmRSS") - baseline_kb
    _reset_peak()
    step()
    peak_kb = _status_kb("VmHWM") - baseline_kb
    return {"peak_mb": peak_kb / 1024, "model_mb": model_kb / 1024}


_FRESH_PROCESS_PRELOAD = ["torch", "torch._dynamo", "transformers", "peft", "bitsandbytes", "lowrank",
                          "benchmarks.bench_model"]  # fmt: skip


def _run_and_send(send, fn, args) -> None:
    gc.freeze()  # the imported modules' objects: collections skip them (2 x 0.25 s each, and no page copies)
    try:
        send.send((True, fn(*args)))
    except BaseException:
        send.send((False, traceback.format_exc()))


def _fresh_process_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_FRESH_PROCESS_PRELOAD)  # no effect once the server runs
    return ctx


def in_fresh_process(fn: Callable, *args, timeout_s: float = MEMORY_TIMEOUT_S):
    """``fn(*args)`` in a process of its own, forked from a server process that has imported torch,
    transformers, PEFT, bitsandbytes and lowrank and run nothing (multiprocessing's "forkserver"): a
    fresh process that pays no import (peft's alone takes 6 s here)."""
    ctx = _fresh_process_context()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_run_and_send, args=(send, fn, args))
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise TimeoutError(f"{fn.__name__}{args}: no answer from its process in {timeout_s:.0f} s")
        ok, value = receive.recv()
    except EOFError:
        process.join(10)
        ok, value = False, f"the process died (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.join(10)
        if process.is_alive():
            process.kill()
    if not ok:
        raise RuntimeError(f"{fn.__name__}{args} in a fresh process:\n{value}")
    return value


@pytest.fixture(scope="module", autouse=True)
def _fresh_process_server_early(request):
    """Quick mode (CI), where no time counts: when a training or memory test is selected, the fresh
    processes' server starts its imports at the file's first test, in the background, rather than when
    the first such test waits for it."""
    fresh = ("test_train_step", "test_train_step_memory", "test_train_step_autocast", "test_train_step_autocast_memory")
    if QUICK and any(getattr(item, "originalname", None) in fresh for item in request.session.items):
        _fresh_process_context()
        multiprocessing.forkserver.ensure_running()
    yield


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_memory(arch, summary_tables):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (VmHWM)")
    dtype = torch.float32  # bf16 halves what is stored and adds nothing else to compare
    methods = with_fast_loss(methods_for(dtype, PLAIN_TRAIN, training=True), dtype, arch)
    peak = {m: in_fresh_process(step_memory, arch, m, dtype, QUICK)["peak_mb"] for m in methods}
    table = model_table(summary_tables, arch)
    add_rows(table, "memory", dtype, peak, PLAIN_TRAIN, "fresh")
    add_rows(table, "memory_fast", dtype, variant_values(peak, dtype, FAST_LOSS), PLAIN_TRAIN, "fresh")
    add_rows(table, "memory_fused", dtype, variant_values(peak, dtype, FUSED_HEAD), PLAIN_TRAIN, "fresh")
    add_rows(table, "memory_lean", dtype, variant_values(peak, dtype, LEAN), PLAIN_TRAIN, "fresh")
    add_rows(table, "memory_attention", dtype, variant_values(peak, dtype, LEAN + ATTENTION), PLAIN_TRAIN, "fresh")
    if has_rms_norms(arch):
        add_rows(table, "memory_norm", dtype, variant_values(peak, dtype, LEAN + ATTENTION + NORM), PLAIN_TRAIN, "fresh")


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_autocast_memory(arch, summary_tables):
    """The peak of :func:`test_train_step_autocast`'s step, each method in a fresh process (as
    :func:`test_train_step_memory`): an fp32 model whose forward runs under autocast, where every
    ``F.linear`` (PEFT's, the plain model's) keeps its bf16 copy of W until the backward, and lowrank's
    layers keep none of a frozen W (lowrank/_autocast.py's ``cast_frozen``)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (VmHWM)")
    methods = methods_for(torch.float32, PLAIN_TRAIN, training=True)
    peak = {m: in_fresh_process(step_memory, arch, m, torch.float32, QUICK, True)["peak_mb"] for m in methods}
    add_rows(model_table(summary_tables, arch), "memory_autocast", torch.float32, peak, PLAIN_TRAIN, "fresh")


# ---------------------------------------------------------------------------------------------
# Inference: decode and prefill, over one set of models per (model, dtype)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=CASES, ids=case_id)
def inference_models(request):
    arch, dtype = request.param
    models = build_all(arch, dtype, with_fast_attention(methods_for(dtype, PLAIN_INFERENCE, training=False), dtype, arch))
    yield arch, dtype, models
    models.clear()
    gc.collect()


def _inference(metric: str, inference_models, summary_tables) -> None:
    arch, dtype, models = inference_models
    make = decode_call if metric == "decode" else prefill_call
    calls = {m: make(model, arch) for m, model in models.items()}
    rounds = interleaved_rounds_warmed_once(calls)
    median = interleaved_medians(calls, rounds)
    table = model_table(summary_tables, arch)
    add_rows(table, metric, dtype, median, PLAIN_INFERENCE, str(rounds))
    add_rows(table, metric + "_attention", dtype, variant_values(median, dtype, ATTENTION), PLAIN_INFERENCE, str(rounds))
    if has_rms_norms(arch):
        add_rows(table, metric + "_norm", dtype, variant_values(median, dtype, ATTENTION + NORM), PLAIN_INFERENCE,
                 str(rounds))  # fmt: skip


def test_decode(inference_models, summary_tables):
    _inference("decode", inference_models, summary_tables)


def test_prefill(inference_models, summary_tables):
    _inference("prefill", inference_models, summary_tables)


def test_decode_batch(inference_models, summary_tables):
    """Decoding DECODE_BATCH sequences at once: each layer call has that many tokens, the range where the
    fused few-token kernels meet the GEMMs (the measured crossover). The methods themselves, without the
    attention and norm variants."""
    arch, dtype, models = inference_models
    bases = {m: model for m, model in models.items() if not m.endswith((ATTENTION, NORM))}
    calls = {m: decode_call(model, arch, DECODE_BATCH) for m, model in bases.items()}
    rounds = interleaved_rounds_warmed_once(calls)
    median = interleaved_medians(calls, rounds)
    add_rows(model_table(summary_tables, arch), "decode_batch", dtype, median, PLAIN_INFERENCE, str(rounds))
