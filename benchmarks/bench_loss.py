"""The language-model loss: ``lowrank.causal_lm_loss`` against transformers' ``ForCausalLMLoss``.

Logits of SmolLM2-135M's vocabulary (49152) for the tokens of a training step (4 x 128) and of a longer
one (8 x 512), fp32 and bf16, with requires_grad: each call is the loss's forward and backward (the
gradient reaching the logits), ``num_items_in_batch`` unset (the mean), a tenth of the labels
``-100``. transformers upcasts the logits to fp32 (``logits.float()``) and runs torch's
``cross_entropy``; lowrank reads them as they are (csrc/cpu/cross_entropy.cpp) and keeps one float
per row. Both compute in fp32 and return the same loss; the interleaved medians go to one table.

    pytest benchmarks/bench_loss.py -s
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_loss.py -q     # CI: a small vocabulary, each call once
"""

from __future__ import annotations

import pytest
import torch

import lowrank

from ._report import cpu_name, dtype_label, format_ms, format_ratio
from ._timing import QUICK, interleaved_medians, interleaved_rounds

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

VOCAB = 512 if QUICK else 49152
TOKENS = [(2, 16)] if QUICK else [(4, 128), (8, 512)]


def loss_call(fn, logits: torch.Tensor, labels: torch.Tensor):
    def call():
        loss = fn(logits, labels, VOCAB)
        loss.backward()
        logits.grad = None
        return loss.detach()

    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_label)
def test_loss_interleaved(dtype, summary_tables):
    table = summary_tables.table(
        f"Causal-LM loss forward+backward, vocabulary {VOCAB}, {torch.get_num_threads()} threads on {cpu_name()}: "
        "ms per call (interleaved medians)",
        ("dtype", "tokens", "transformers", "lowrank", "lowrank/transformers", "rounds"),
    )
    generator = torch.Generator().manual_seed(0)
    for batch, seq in TOKENS:
        logits = (2 * torch.randn(batch, seq, VOCAB, generator=generator)).to(dtype).requires_grad_()
        labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
        labels[torch.rand(batch, seq, generator=generator) < 0.1] = -100
        calls = {"transformers": loss_call(ForCausalLMLoss, logits, labels),
                 "lowrank": loss_call(lowrank.causal_lm_loss, logits, labels)}  # fmt: skip
        mine, theirs = calls["lowrank"](), calls["transformers"]()
        assert torch.allclose(mine, theirs, rtol=1e-5), (mine, theirs)
        rounds = interleaved_rounds(calls)
        median = interleaved_medians(calls, rounds)
        table.add_row(dtype_label(dtype), f"{batch}x{seq}", format_ms(median["transformers"]),
                      format_ms(median["lowrank"]), format_ratio(median["lowrank"], median["transformers"]),
                      str(rounds))  # fmt: skip
