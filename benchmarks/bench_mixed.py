"""Mixed-adapter batches: one forward where each row uses its own LoRA adapter (``lowrank.mixed_batch``).

1. One layer, SmolLM2-135M's MLP up projection (576 -> 1536, fp32), LoRA r=16 adapters, rows spread
   round-robin over 1, 4 or 16 adapters; 8, 32 and 128 rows, at decode (one token per row) and
   prefill (128 tokens per row). Peers, timed interleaved in one run:
   - ``mixed``: lowrank's mixed kernels (``mixed_batch``);
   - ``one adapter``: the same batch with every row on one adapter, lowrank's ordinary path — what
     the targets compare against (decode 8 rows / 4 adapters <= 1.15x, 128 rows / 16 adapters
     <= 1.3x; prefill <= 1.1x);
   - ``PEFT``: PEFT's ``adapter_names`` (a Python loop over the adapters present: index, compute,
     scatter); target: lowrank <= 0.5x at decode, 8 rows / 4 adapters;
   - ``torch ops``: vLLM's CPU approach — each row's A and B gathered with ``index_select`` from
     stacked adapters, then ``bmm``.
2. A whole model of SmolLM2-135M's shape (30 layers, built from its config: no download), four LoRA
   adapters r=16 on every projection, 8 rows over 4 adapters: greedy ``generate`` of 8 tokens from a
   16-token prompt, lowrank mixed vs one adapter vs PEFT's ``generate(adapter_names=...)``.

``test_*_same_*`` check, on small shapes, that the peers compute the same thing.

    pytest benchmarks/bench_mixed.py -s
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_mixed.py -q      # CI: tiny shapes, one call each
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import pytest
import torch
from torch import nn

import lowrank
from lowrank.adapters.mixed import MixedBatch

from ._peers import available
from ._report import format_ms, format_ratio
from ._timing import QUICK, interleaved_medians, interleaved_rounds, interleaved_rounds_warmed_once

IN, OUT = (64, 96) if QUICK else (576, 1536)
RANK, ALPHA = 16, 32
ROWS = (8, 32) if QUICK else (8, 32, 128)
ADAPTERS = (1, 4) if QUICK else (1, 4, 16)
PHASES = {"decode": 1, "prefill": 8 if QUICK else 128}
TARGETS = {("decode", 8, 4): 1.15, ("decode", 128, 16): 1.3, ("prefill", 128, 16): 1.1, ("prefill", 8, 4): 1.1}
PEFT_TARGET = 0.5  # decode, 8 rows over 4 adapters: lowrank / PEFT


def names_for(rows: int, adapters: int) -> list[str]:
    return [f"a{i % adapters}" for i in range(rows)]


class Layer:
    """One base ``nn.Linear`` with ``adapters`` LoRA adapters (random B), in lowrank and in PEFT."""

    def __init__(self, adapters: int, k: int = IN, n: int = OUT, with_peft: bool = True):
        torch.manual_seed(0)
        base = nn.Linear(k, n)
        self.model = nn.Sequential(copy.deepcopy(base))
        for i in range(adapters):
            lowrank.inject(self.model, lowrank.LoRAConfig(r=RANK, alpha=ALPHA, target_modules=["0"]), f"a{i}")
        self.layer = self.model[0]
        with torch.no_grad():
            for name, p in self.layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        lowrank.set_adapter(self.model, "a0")
        factors = [self.layer.adapters[f"a{i}"] for i in range(adapters)]
        self.a_stack = torch.stack([f.lora_A.weight.detach() for f in factors])  # [adapters, r, k]
        self.b_stack = torch.stack([f.lora_B.weight.detach() for f in factors])  # [adapters, n, r]
        self.scaling = factors[0].scaling
        self.base = base
        self.peft = self._peft(base, adapters) if with_peft and available("peft") else None

    def _peft(self, base: nn.Module, adapters: int):
        import peft

        def config():
            return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config(), adapter_name="a0")
            for i in range(1, adapters):
                model.add_adapter(f"a{i}", config())
        layer = model.base_model.model[0]
        with torch.no_grad():
            for i in range(adapters):
                layer.lora_A[f"a{i}"].weight.copy_(self.a_stack[i])
                layer.lora_B[f"a{i}"].weight.copy_(self.b_stack[i])
        return layer.eval()

    def calls(self, x: torch.Tensor, names: list[str]) -> dict[str, Callable[[], object]]:
        batch = MixedBatch(names)
        ids = torch.tensor([int(n[1:]) for n in names])
        layer = self.layer

        def mixed():
            layer._mixed = batch
            try:
                return layer(x)
            finally:
                layer._mixed = None

        def one():
            return layer(x)

        def torch_ops():  # vLLM's CPU path: gather each row's factors, then batched GEMMs
            a = self.a_stack.index_select(0, ids)  # [rows, r, k]
            b = self.b_stack.index_select(0, ids)  # [rows, n, r]
            u = torch.bmm(x, a.transpose(1, 2))
            return self.base(x).add_(torch.bmm(u, b.transpose(1, 2)), alpha=self.scaling)

        fns = {"mixed": mixed, "one adapter": one, "torch ops": torch_ops}
        if self.peft is not None:
            fns["PEFT"] = lambda: self.peft(x, adapter_names=names)
        return fns


def _no_grad(fns):
    def wrap(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    return {k: wrap(f) for k, f in fns.items()}


@pytest.fixture(scope="module")
def layers() -> dict[int, Layer]:
    return {a: Layer(a) for a in ADAPTERS}


CASES = [(phase, rows, adapters) for phase in PHASES for rows in ROWS for adapters in ADAPTERS]


@pytest.mark.parametrize("phase,rows,adapters", CASES, ids=[f"{p}-{r}rows-{a}ad" for p, r, a in CASES])
def test_layer_interleaved(layers, summary_tables, phase, rows, adapters):
    layer = layers[adapters]
    torch.manual_seed(1)
    x = torch.randn(rows, PHASES[phase], IN)
    fns = _no_grad(layer.calls(x, names_for(rows, adapters)))
    rounds = interleaved_rounds(fns)
    median = interleaved_medians(fns, rounds)
    table = summary_tables.table(
        f"Mixed-adapter batch, one layer {IN} -> {OUT} fp32, LoRA r={RANK}, {torch.get_num_threads()} threads: "
        f"ms per forward (interleaved medians)",
        ("case", "mixed", "one adapter", "PEFT", "torch ops", "mixed/one", "mixed/PEFT", "mixed/torch ops", "rounds"),
    )
    target = TARGETS.get((phase, rows, adapters))
    ratio = median["mixed"] / median["one adapter"]
    one = format_ratio(median["mixed"], median["one adapter"])
    if target is not None:
        one += f" ({'met' if ratio <= target else 'MISSED'} <= {target})"
    peft = format_ratio(median["mixed"], median.get("PEFT"))
    if (phase, rows, adapters) == ("decode", 8, 4) and "PEFT" in median:
        met = median["mixed"] / median["PEFT"] <= PEFT_TARGET
        peft += f" ({'met' if met else 'MISSED'} <= {PEFT_TARGET})"
    table.add_row(
        f"{phase}: {rows} rows x {PHASES[phase]} tok, {adapters} adapters",
        format_ms(median["mixed"]), format_ms(median["one adapter"]), format_ms(median.get("PEFT")),
        format_ms(median["torch ops"]), one, peft, format_ratio(median["mixed"], median["torch ops"]), str(rounds),
    )  # fmt: skip


@pytest.mark.parametrize("rows,adapters", [(8, 4), (5, 3)])
def test_layer_peers_compute_the_same(rows, adapters):
    layer = Layer(adapters, k=40, n=24)
    x = torch.randn(rows, 3, 40)
    out = {k: f() for k, f in _no_grad(layer.calls(x, names_for(rows, adapters))).items()}
    for peer in ("torch ops", "PEFT"):
        if peer in out:
            torch.testing.assert_close(out["mixed"], out[peer], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A whole model generating with a mixed batch
# ---------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)  # fmt: skip
SHAPE = TINY if QUICK else SMOLLM2_135M
GEN_ROWS, GEN_ADAPTERS, PROMPT, NEW = 8, 4, 16, (2 if QUICK else 8)


def generation_models(shape: dict = SHAPE):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    peft_base = copy.deepcopy(base) if available("peft") else None
    for i in range(GEN_ADAPTERS):
        lowrank.inject(base, lowrank.LoRAConfig(r=RANK, alpha=ALPHA), f"a{i}")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lowrank.set_adapter(base, "a0")
    models = {"lowrank": base}
    if peft_base is not None:
        import peft

        def config():
            return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(peft_base, config(), adapter_name="a0")
            for i in range(1, GEN_ADAPTERS):
                pm.add_adapter(f"a{i}", config())
        with torch.no_grad():
            for layer_name, layer in lowrank.adapted_layers(base):
                peft_layer = pm.base_model.model.get_submodule(layer_name)
                for i in range(GEN_ADAPTERS):
                    peft_layer.lora_A[f"a{i}"].weight.copy_(layer.adapters[f"a{i}"].lora_A.weight)
                    peft_layer.lora_B[f"a{i}"].weight.copy_(layer.adapters[f"a{i}"].lora_B.weight)
        models["peft"] = pm.eval()
    return models


def generate_calls(models, shape: dict = SHAPE, new: int = NEW):
    ids = torch.randint(1, shape["vocab_size"], (GEN_ROWS, PROMPT), generator=torch.Generator().manual_seed(2))
    names = names_for(GEN_ROWS, GEN_ADAPTERS)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    mine = models["lowrank"]

    def mixed():
        with lowrank.mixed_batch(mine, names):
            return mine.generate(ids, **kw)

    fns = {"mixed": mixed, "one adapter": lambda: mine.generate(ids, **kw)}
    if "peft" in models:
        fns["PEFT"] = lambda: models["peft"].generate(input_ids=ids, adapter_names=names, **kw)
    return _no_grad(fns)


def test_generate_interleaved(summary_tables):
    fns = generate_calls(generation_models())
    rounds = interleaved_rounds_warmed_once(fns, budget_s=30.0)
    median = interleaved_medians(fns, rounds)
    table = summary_tables.table(
        f"Mixed-adapter generate, Llama of {'SmolLM2-135M' if SHAPE is SMOLLM2_135M else 'tiny'} shape, "
        f"{GEN_ROWS} rows over {GEN_ADAPTERS} LoRA r={RANK} adapters (all linear layers), {PROMPT}-token prompt + "
        f"{NEW} new tokens, fp32, {torch.get_num_threads()} threads: ms per generate (interleaved medians)",
        ("mixed", "one adapter", "PEFT adapter_names", "mixed/one", "mixed/PEFT", "rounds"),
    )
    table.add_row(
        format_ms(median["mixed"]), format_ms(median["one adapter"]), format_ms(median.get("PEFT")),
        format_ratio(median["mixed"], median["one adapter"]), format_ratio(median["mixed"], median.get("PEFT")),
        str(rounds),
    )  # fmt: skip


def test_generate_peers_compute_the_same():
    models = generation_models(TINY)
    out = {k: f() for k, f in generate_calls(models, TINY, new=4).items() if k != "one adapter"}
    if "PEFT" in out:
        assert torch.equal(out["mixed"], out["PEFT"])
