"""One fine-tuning run per method, each from the same loaded base, measured the same way.

- Loss on the completion tokens only: the decoder's hidden states at those positions go through the
  output head, not every position's (the vocabulary is 49152 wide: most of a step otherwise).
- Peak memory: what the method holds — its model's tensors (the frozen base or the 4-bit one, the
  dense delta of full fine-tuning, the adapter), the optimizer's state — plus the most one training
  step adds (activations, gradients, temporaries), read from the kernel's high-water mark (VmHWM,
  reset through /proc/self/clear_refs before each step but the first, which pays one-time costs)
  above the resident size at the step's start. On CUDA, the allocator's own peak.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import lowrank

from .._proc import release_freed_memory, reset_peak, status_kb
from .data import Dataset, Example

METHODS = ("full", "lora", "vera", "qlora")
# Learning rates that learn the built-in facts in the default step count (AdamW; --lr overrides all).
DEFAULT_LR = {"full": 1e-4, "lora": 2e-3, "vera": 5e-2, "qlora": 2e-3}
VERA_RANK = 256


@dataclass
class Settings:
    steps: int = 24
    batch_size: int = 16
    seq_len: int = 64
    r: int = 16
    alpha: float = 32.0
    lr: Optional[float] = None
    seed: int = 0
    out: Path = Path("lowrank-finetune")
    device: str = "cpu"
    progress: bool = True
    dtype: str = "fp32"  # the base's dtype, fp32 or bf16; or "amp": fp32 weights, each training forward under
    # torch.autocast in bf16 (mixed precision, as transformers' Trainer with bf16=True)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[list[int]]
    starts: list[int]  # index of each example's first completion token


def encode(tokenizer, examples: list[Example], seq_len: int) -> Encoded:
    ids, starts = [], []
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids if ex.prompt else []
        full = tokenizer(ex.prompt + ex.completion, add_special_tokens=False).input_ids + [eos]
        # The completion starts after the prompt's tokens. (Where BPE merges a token across the seam the
        # first completion token then also carries the prompt's last characters: rare, and not corrected.)
        start = len(prompt)
        full = full[:seq_len]
        ids.append(full)
        starts.append(max(1, min(start, len(full) - 1)))
    return Encoded(ids, starts)


def collate(enc: Encoded, index: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, target_mask)``; ``target_mask[b, t]``: token t is a
    completion token (predicted from position t-1)."""
    width = max(len(enc.ids[i]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(index), width, dtype=torch.long)
    target = torch.zeros(len(index), width, dtype=torch.bool)
    for row, i in enumerate(index):
        seq = enc.ids[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        target[row, enc.starts[i] : len(seq)] = True
    return ids.to(device), attn.to(device), target.to(device)


def completion_loss(model, ids, attn, target, reduction="mean"):
    """Cross-entropy of the completion tokens, the output head applied to their positions only, fused
    with the loss where the head is a plain ``nn.Linear`` or the FrozenLinear ``inject`` makes of one
    (``lowrank.linear_cross_entropy``: fp32, as F.cross_entropy(logits.float(), ...), the head's GEMMs
    the measured fastest, no logits kept). The batch is right-padded (``collate``): under
    ``lowrank.fast_attention`` its mask runs on the kernel."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    sel = target[:, 1:]
    rows, labels = hidden[:, :-1][sel], ids[:, 1:][sel]
    head = model.get_output_embeddings()
    if type(head) in (torch.nn.Linear, lowrank.FrozenLinear):
        return lowrank.linear_cross_entropy(rows, head.weight, labels, bias=head.bias, reduction=reduction)
    return lowrank.cross_entropy(head(rows), labels, reduction=reduction)


@torch.no_grad()
def heldout_loss(model, enc: Encoded, pad_id: int, device, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    for b in range(0, len(enc.ids), batch_size):
        index = list(range(b, min(len(enc.ids), b + batch_size)))
        ids, attn, target = collate(enc, index, pad_id, device)
        total += completion_loss(model, ids, attn, target, reduction="sum").item()
        count += int(target[:, 1:].sum())
    return total / max(count, 1)


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device, batch_size: int = 32) -> list[str]:
    """Greedy answers: the first non-empty line of each."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for b in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[b : b + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            for row in gen[:, batch.input_ids.shape[1] :]:
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(model, tokenizer, examples: list[Example], device) -> tuple[float, list[str]]:
    longest = max(len(tokenizer(e.completion, add_special_tokens=False).input_ids) for e in examples)
    got = answers(model, tokenizer, [e.prompt for e in examples], longest + 2, device)
    hits = sum(g == e.completion.strip() for g, e in zip(got, examples))
    return 100.0 * hits / len(examples), got


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _step_start(device: torch.device) -> Optional[int]:
    """Resets the peak and returns the bytes in use now (None where they cannot be read)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    rss = status_kb("VmRSS") if reset_peak() else None
    return None if rss is None else rss * 1024


def _step_growth(device: torch.device, start: int) -> Optional[int]:
    """Bytes the peak rose above ``start`` since ``_step_start``."""
    if device.type == "cuda":
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    hwm = status_kb("VmHWM")
    return None if hwm is None else max(0, hwm * 1024 - start)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.untyped_storage().nbytes() for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------------------------------------
# A method's run
# ---------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    method: str
    trainable: int
    total: int
    adapter_bytes: int
    peak_bytes: Optional[int]
    held_bytes: int  # the part of the peak held between steps: the model's tensors and the optimizer's state
    seconds_per_step: float
    tokens_per_s: float
    losses: list[float]
    loss_after: float
    em_after: Optional[float]
    samples: list[str] = field(default_factory=list)
    adapter_dir: str = ""


def build(method: str, base: torch.nn.Module, s: Settings) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if method == "full":
        config = lowrank.FullConfig(target_modules="all-linear")
    elif method == "lora":
        config = lowrank.LoRAConfig(r=s.r, alpha=s.alpha, target_modules="all-linear")
    elif method == "vera":
        config = lowrank.VeRAConfig(r=VERA_RANK, target_modules="all-linear")
    elif method == "qlora":
        config = lowrank.QLoRAConfig(r=s.r, alpha=s.alpha, target_modules="all-linear", quantize_base="all-linear")
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    model = lowrank.inject(model, config, adapter_name=method)
    return lowrank.fast_decoder(model)  # attention, norms and MLP products on lowrank's kernels


def run_method(method: str, base, tokenizer, data: Dataset, enc_train: Encoded, enc_eval: Encoded, s: Settings,
               progress=None) -> MethodResult:  # fmt: skip
    device = torch.device(s.device)
    release_freed_memory()
    torch.manual_seed(s.seed)  # each method's init is the same whatever ran before it
    model = build(method, base, s).to(device)
    model.train()
    params = [p for _, p in lowrank.adapter_parameters(model, method)]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in base.parameters())
    lr = s.lr if s.lr is not None else DEFAULT_LR[method]
    # torch's fused AdamW: one pass per tensor, where the default runs several ops each (full fine-tuning's
    # 106 M parameters: 43 against 167 ms a step on a Zen 5, 2 threads)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    rng = random.Random(s.seed)
    order: list[int] = []
    losses, tokens, step_times, growth = [], [], [], []
    pad = tokenizer.pad_token_id
    for step in range(s.steps):
        if len(order) < s.batch_size:  # epochs of a fixed shuffle
            more = list(range(len(enc_train.ids)))
            rng.shuffle(more)
            order += more
        index, order = order[: s.batch_size], order[s.batch_size :]
        ids, attn, target = collate(enc_train, index, pad, device)
        start_bytes = _step_start(device) if step > 0 else None
        start = time.perf_counter()
        # PointwiseRecompute: the same gradients, less activation memory held to the backward
        with lowrank.PointwiseRecompute(), torch.autocast(device.type, torch.bfloat16, enabled=s.dtype == "amp"):
            loss = completion_loss(model, ids, attn, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        if start_bytes is not None:
            growth.append(_step_growth(device, start_bytes))
        tokens.append(int(attn.sum()))
        losses.append(loss.item())
        if progress is not None:
            progress(method, step + 1, s.steps, losses[-1])
    # What the method holds: its model's tensors, the optimizer's state, and the most one step adds
    # on top (activations, gradients, the optimizer's temporaries), read from the kernel's high-water
    # mark. The first step is left out: it allocates the optimizer state (counted above) and pays
    # one-time costs (kernel calibration, caches) no later step repeats.
    grown = [g for g in growth if g is not None]
    held = tensor_bytes(model) + optimizer_bytes(opt)
    peak = held + max(grown) if grown else None
    model.eval()
    loss_after = heldout_loss(model, enc_eval, pad, device)
    em = None
    if data.exact_match:
        em, got = exact_match(model, tokenizer, data.eval, device)
    else:
        got = []
    out_dir = Path(s.out) / method
    lowrank.save_adapter(model, out_dir, adapter_name=method)
    adapter_bytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    first = 1 if len(step_times) > 1 else 0  # the first step pays one-time costs
    measured, measured_tokens = step_times[first:], tokens[first:]
    result = MethodResult(
        method=method, trainable=trainable, total=total, adapter_bytes=adapter_bytes, peak_bytes=peak, held_bytes=held,
        seconds_per_step=sum(measured) / len(measured), tokens_per_s=sum(measured_tokens) / max(sum(measured), 1e-9),
        losses=losses, loss_after=loss_after, em_after=em, samples=got[:4], adapter_dir=str(out_dir),
    )  # fmt: skip
    del model, opt
    release_freed_memory()
    return result


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
