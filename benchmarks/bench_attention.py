"""Causal self-attention: ``lowrank.causal_attention`` against torch's ``scaled_dot_product_attention``.

One decoder layer's attention of SmolLM2-135M's shape (9 query heads over 3 key/value heads, head
dimension 64): a training step's 4 x 128 tokens, forward and backward (the gradients of q, k and v), the
same right-padded (sequences of 128 down to 52 tokens: SDPA given the padding mask transformers builds,
lowrank the key ranges), and a 512-token prefill, forward only; fp32 and bf16. The query is a transposed
view, as transformers hands it over. torch runs its CPU flash-attention kernel (``is_causal=True`` or the
mask, ``enable_gqa=True``); lowrank its own (csrc/cpu/attention.cpp). Both sum in fp32; the interleaved
medians go to one table.

    pytest benchmarks/bench_attention.py -s
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_attention.py -q     # CI: tiny shapes, each call once
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank

from ._report import cpu_name, dtype_label, format_ms, format_ratio
from ._timing import QUICK, interleaved_medians, interleaved_rounds

HEADS, KV_HEADS, HEAD_DIM = (4, 2, 16) if QUICK else (9, 3, 64)
CASES = ([("train", 2, 8), ("train-padded", 2, 8), ("prefill", 1, 16)] if QUICK
         else [("train", 4, 128), ("train-padded", 4, 128), ("prefill", 1, 512)])  # fmt: skip


def right_padding(batch: int, seq: int) -> torch.Tensor:
    """A right-padded batch's sequence lengths: the longest, then shorter ones down to ~40 %."""
    return torch.tensor([seq - (seq * 6 // 10) * i // max(1, batch - 1) for i in range(batch)])


def attention_call(fn, q, k, v, backward: bool):
    def call():
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
        return out.detach()

    return call


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def padded_calls(lengths: torch.Tensor, seq: int):
    """SDPA with the padding mask as transformers builds it (causal and each sequence's real keys), and
    lowrank's kernel with the same mask as key ranges."""
    keys = torch.arange(seq)
    mask = (keys[None, :] <= keys[:, None])[None, None] & (keys < lengths[:, None, None, None])

    def masked_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ranges = torch.stack([torch.zeros_like(lengths), lengths], 1)

    def masked_lowrank(q, k, v):
        return lowrank.causal_attention(q, k, v, key_ranges=ranges)

    return masked_sdpa, masked_lowrank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_label)
def test_attention_interleaved(dtype, summary_tables):
    table = summary_tables.table(
        f"Causal attention, {HEADS} heads over {KV_HEADS}, head dimension {HEAD_DIM}, {torch.get_num_threads()} "
        f"threads on {cpu_name()}: ms per call (interleaved medians)",
        ("dtype", "case", "tokens", "torch SDPA", "lowrank", "lowrank/SDPA", "rounds"),
    )
    generator = torch.Generator().manual_seed(0)
    for case, batch, seq in CASES:
        backward = case.startswith("train")
        q = torch.randn(batch, seq, HEADS, HEAD_DIM, generator=generator).to(dtype).transpose(1, 2)
        k, v = (torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        theirs_fn, mine_fn = sdpa, lowrank.causal_attention
        if case == "train-padded":
            theirs_fn, mine_fn = padded_calls(right_padding(batch, seq), seq)
        calls = {"sdpa": attention_call(theirs_fn, q, k, v, backward),
                 "lowrank": attention_call(mine_fn, q, k, v, backward)}  # fmt: skip
        mine, theirs = calls["lowrank"](), calls["sdpa"]()
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(mine.float(), theirs.float(), rtol=tol, atol=tol)
        rounds = interleaved_rounds(calls)
        median = interleaved_medians(calls, rounds)
        pass_name = ("fwd+bwd" if backward else "fwd") + (", right-padded" if case == "train-padded" else "")
        table.add_row(dtype_label(dtype), pass_name, f"{batch}x{seq}", format_ms(median["sdpa"]),
                      format_ms(median["lowrank"]), format_ratio(median["lowrank"], median["sdpa"]), str(rounds))  # fmt: skip
