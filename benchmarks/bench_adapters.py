"""Model-level adapters (``lowrank.inject``): switching adapters, and a full fine-tuning step.

The model is a Llama of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads,
vocab 49152, tied embeddings), built from its config with random weights (no download), in fp32.
"all-linear" targets its 210 projections (every ``nn.Linear`` but the tied ``lm_head``).

1. Adapter swap. Two LoRA adapters (r=16, alpha=32), "a" and "b", on every projection. The swap is
   one ``lowrank.set_adapter`` call, alternating "a" and "b"; it is timed against one forward of the
   same model on 1 x 512 tokens (eval mode, ``torch.no_grad()``) and reported as a fraction of it
   (target: under 5 %). The peer is PEFT (``get_peft_model`` + ``add_adapter``, over a copy of the
   same base, holding the same A and B): its ``PeftModel.set_adapter`` (which also makes the adapter
   trainable, as PEFT does by default) against its own forward. Both adapters' ``lora_B`` are random
   (not PEFT's zero init), so the two adapters compute different models and the forward does the
   adapter's work.
2. Full fine-tuning step. ``lowrank.inject(model, FullConfig("all-linear"))`` (each projection
   trains a dense copy of its weight while the base weight stays frozen) against plain PyTorch
   full fine-tuning of the same parameters: a copy of the same model where only those projections'
   weights have ``requires_grad``. A step is the forward on 4 x 128 tokens with ``labels`` (HF's
   loss), backward, ``AdamW.step()`` and ``zero_grad(set_to_none=True)``; the ratio lowrank / plain
   is the target (at most 1.05). The peak memory of one step is measured in fresh processes
   (``python -m benchmarks.bench_adapters --memory-step plain|lowrank``), as benchmarks/_memory_step.py
   does for layer stacks: VmHWM above the post-import baseline, the counter reset after the model is
   built. lowrank holds the frozen ``W0`` next to the trained ``W``, so its model is larger by the
   projections' weights.

Each timed call is a pytest-benchmark case (group per call, the peers side by side); the
``*_interleaved`` tests time the peers interleaved (benchmarks/_timing.py) and fill the summary tables
printed at the end. The full fine-tuning comparison gets STEP_INTERLEAVED_BUDGET_S instead of the
default budget: its target is a 5 % difference, which three rounds of a multi-second step on this
noisy machine do not resolve. The ``test_*_same_*`` tests check, on a tiny model, that the peers
compute the same thing.

    pytest benchmarks/bench_adapters.py -s                          # SmolLM2-135M's shape
    LOWRANK_BENCH_QUICK=1 pytest benchmarks/bench_adapters.py -q    # CI: a 2-layer, hidden-64 Llama
    pytest benchmarks/bench_adapters.py -k "step_interleaved"

transformers is required (the file is skipped without it); PEFT is optional (its columns read "—").
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import lowrank

from ._memory_step import _reset_peak, _status_kb, fixed_allocator
from ._peers import available
from ._report import format_ms, format_ratio
from ._timing import QUICK, benchmark_within_budget, interleaved_medians, interleaved_rounds, rounds_within
from ._timing import seconds_per_call

transformers = pytest.importorskip("transformers")

# HuggingFaceTB/SmolLM2-135M's config.json, the parts that shape the compute.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)  # fmt: skip
SHAPE = TINY if QUICK else SMOLLM2_135M
FORWARD_TOKENS = (1, 64) if QUICK else (1, 512)  # (batch, sequence) of the forward the swap is set against
STEP_TOKENS = (2, 16) if QUICK else (4, 128)  # (batch, sequence) of a training step
RANK, ALPHA = 16, 32
ADAPTERS = ("a", "b")
B_STD = 0.01  # the random lora_B: the adapters change the logits without swamping them
LR = 1e-5
SWAP_TARGET = 0.05  # swap / forward
STEP_TARGET = 1.05  # lowrank step / plain step
# A step of SmolLM2-135M's shape takes ~3.4 s here (2 threads): 40 s gives six rounds of both peers.
STEP_INTERLEAVED_BUDGET_S = 40.0
MEMORY_METHODS = ("plain", "lowrank")


def shape_label(shape: dict = SHAPE) -> str:
    name = "SmolLM2-135M's shape" if shape == SMOLLM2_135M else "tiny"
    return f"Llama {name} ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']})"


def tokens_label(tokens: tuple[int, int]) -> str:
    return f"{tokens[0]}x{tokens[1]}"


def llama(shape: dict = SHAPE) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random weights, fp32."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))


def token_ids(tokens: tuple[int, int], shape: dict = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, shape["vocab_size"], tokens, generator=generator)


# ---------------------------------------------------------------------------------------------
# Adapter swap
# ---------------------------------------------------------------------------------------------
def peft_lora_model(base: nn.Module, mine: nn.Module) -> nn.Module:
    """PEFT's LoRA over ``base`` with adapters "a" and "b" holding ``mine``'s A and B, "a" active."""
    import peft

    def config():
        return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")

    with warnings.catch_warnings():  # adapter names inside "lora_" (a, b): PEFT warns about reloading
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config(), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.add_adapter(name, config())
    with torch.no_grad():
        for layer_name, layer in lowrank.adapted_layers(mine):
            peft_layer = model.base_model.model.get_submodule(layer_name)
            for name in ADAPTERS:
                peft_layer.lora_A[name].weight.copy_(layer.adapters[name].lora_A.weight)
                peft_layer.lora_B[name].weight.copy_(layer.adapters[name].lora_B.weight)
    model.set_adapter(ADAPTERS[0])
    return model.eval()


def lora_models(shape: dict, with_peft: bool) -> dict[str, nn.Module]:
    """``{"lowrank": ..., "peft": ...}``: one base model, adapters "a" and "b" (random B), "a" active."""
    mine = llama(shape).eval()
    peft_base = copy.deepcopy(mine) if with_peft else None
    for name in ADAPTERS:
        lowrank.inject(mine, lowrank.LoRAConfig(r=RANK, alpha=ALPHA), adapter_name=name)
    with torch.no_grad():
        for name in ADAPTERS:
            for pname, p in lowrank.adapter_parameters(mine, name):
                if "lora_B" in pname:
                    p.normal_(0.0, B_STD)
    lowrank.set_adapter(mine, ADAPTERS[0])
    models = {"lowrank": mine}
    if with_peft:
        models["peft"] = peft_lora_model(peft_base, mine)
    return models


def swap_call(model: nn.Module, peer: str) -> Callable[[], object]:
    """One adapter switch per call, alternating "b", "a", "b", ... (the model starts on "a")."""
    names = itertools.cycle(ADAPTERS[1:] + ADAPTERS[:1])
    if peer == "peft":
        return lambda: model.set_adapter(next(names))
    return lambda: lowrank.set_adapter(model, next(names))


def forward_call(model: nn.Module, tokens: tuple[int, int], shape: dict = SHAPE) -> Callable[[], object]:
    ids = token_ids(tokens, shape)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids).logits

    return forward


@pytest.fixture(scope="module")
def swap_models() -> dict[str, nn.Module]:
    return lora_models(SHAPE, with_peft=available("peft"))


def swap_group(what: str) -> str:
    return f"{shape_label()} LoRA r={RANK} x{len(ADAPTERS)} fp32: {what}"


@pytest.mark.parametrize("peer", ["lowrank", "peft"])
def test_adapter_swap(benchmark, swap_models, peer: str):
    if peer not in swap_models:
        pytest.skip("peft is not installed")
    benchmark.group = swap_group("set_adapter")
    benchmark.extra_info.update(peer=peer, threads=torch.get_num_threads(), layers=SHAPE["num_hidden_layers"])
    benchmark_within_budget(benchmark, swap_call(swap_models[peer], peer))


@pytest.mark.parametrize("peer", ["lowrank", "peft"])
def test_adapted_forward(benchmark, swap_models, peer: str):
    if peer not in swap_models:
        pytest.skip("peft is not installed")
    benchmark.group = swap_group(f"forward {tokens_label(FORWARD_TOKENS)}")
    benchmark.extra_info.update(peer=peer, threads=torch.get_num_threads(), layers=SHAPE["num_hidden_layers"])
    benchmark_within_budget(benchmark, forward_call(swap_models[peer], FORWARD_TOKENS))


def test_adapter_swap_interleaved(swap_models, summary_tables):
    calls = {}
    for peer, model in swap_models.items():
        calls[f"{peer} swap"] = swap_call(model, peer)
        calls[f"{peer} forward"] = forward_call(model, FORWARD_TOKENS)
    rounds = interleaved_rounds(calls)
    median = interleaved_medians(calls, rounds)
    table = summary_tables.table(
        f"Adapter swap against a forward, {shape_label()}, 2 LoRA adapters r={RANK} on all linear layers, fp32, "
        f"{torch.get_num_threads()} threads: ms per call (interleaved medians)",
        ("peer", "set_adapter", f"forward {tokens_label(FORWARD_TOKENS)}", "swap/forward", "rounds"),
    )
    for peer in ("lowrank", "peft"):
        swap, forward = median.get(f"{peer} swap"), median.get(f"{peer} forward")
        fraction = "—" if swap is None else f"{100 * swap / forward:.2f} %"
        table.add_row(peer, format_ms(swap), format_ms(forward), fraction, str(rounds) if swap is not None else "—")
    if "peft swap" in median:
        table.notes.append(
            f"lowrank/PEFT: set_adapter {format_ratio(median['lowrank swap'], median['peft swap'])}, "
            f"forward {format_ratio(median['lowrank forward'], median['peft forward'])}"
        )
    table.notes.append(f"target: lowrank's swap under {100 * SWAP_TARGET:.0f} % of a forward")


def test_swap_peers_compute_the_same_models():
    """Both peers hold the same two adapters; "a" and "b" differ, and a swap changes the output."""
    models = lora_models(TINY, with_peft=available("peft"))
    logits = {}
    for name in ADAPTERS:
        for peer, model in models.items():
            if peer == "peft":
                model.set_adapter(name)
            else:
                lowrank.set_adapter(model, name)
            logits[peer, name] = forward_call(model, (1, 8), TINY)()
    for name in ADAPTERS:
        if "peft" in models:
            torch.testing.assert_close(logits["lowrank", name], logits["peft", name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["lowrank", "a"], logits["lowrank", "b"])
    if "peft" in models:
        peft_layers = [n for n, m in models["peft"].named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A]
        assert len(peft_layers) == len(list(lowrank.adapted_layers(models["lowrank"])))


# ---------------------------------------------------------------------------------------------
# Full fine-tuning step
# ---------------------------------------------------------------------------------------------
def full_finetuning_model(method: str, shape: dict = SHAPE) -> nn.Module:
    """``"lowrank"``: FullConfig("all-linear") injected; ``"plain"``: the same model with only the weights
    lowrank would train (the projections'; no bias in Llama) trainable. Training mode."""
    model = llama(shape).train()
    if method == "lowrank":
        return lowrank.inject(model, lowrank.FullConfig(target_modules="all-linear"))
    if method != "plain":
        raise ValueError(f"method: expected 'plain' or 'lowrank', got {method!r}")
    model.requires_grad_(False)
    # "all-linear": every nn.Linear but the output head (test_full_finetuning_peers_take_the_same_step
    # checks that the two train the same tensors)
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
    for name in layers:
        model.get_submodule(name).weight.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    if any(True for _ in lowrank.adapted_layers(model)):
        return [p for _, p in lowrank.adapter_parameters(model)]
    return [p for p in model.parameters() if p.requires_grad]


def step_call(model: nn.Module, tokens: tuple[int, int], shape: dict = SHAPE) -> Callable[[], torch.Tensor]:
    """One training step per call: forward with labels (HF's loss), backward, AdamW step, zero_grad."""
    ids = token_ids(tokens, shape)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.fixture(scope="module")
def step_calls() -> dict[str, Callable[[], torch.Tensor]]:
    return {method: step_call(full_finetuning_model(method), STEP_TOKENS) for method in MEMORY_METHODS}


def step_group() -> str:
    return f"{shape_label()} full fine-tuning step {tokens_label(STEP_TOKENS)} fp32 AdamW"


@pytest.mark.parametrize("method", MEMORY_METHODS)
def test_full_finetuning_step(benchmark, step_calls, method: str):
    benchmark.group = step_group()
    benchmark.extra_info.update(peer=method, threads=torch.get_num_threads(), layers=SHAPE["num_hidden_layers"])
    benchmark_within_budget(benchmark, step_calls[method])


def test_full_finetuning_step_interleaved(step_calls, summary_tables):
    rounds = rounds_within(STEP_INTERLEAVED_BUDGET_S, sum(seconds_per_call(fn) for fn in step_calls.values()))
    median = interleaved_medians(step_calls, rounds)
    table = summary_tables.table(
        f"Full fine-tuning step (forward with labels, backward, AdamW, zero_grad), fp32, {torch.get_num_threads()} "
        "threads: ms per step (interleaved medians)",
        ("model", "tokens", "plain PyTorch", "lowrank FullConfig", "lowrank/plain", "rounds"),
    )
    table.add_row(shape_label(), tokens_label(STEP_TOKENS), format_ms(median["plain"]), format_ms(median["lowrank"]),
                  format_ratio(median["lowrank"], median["plain"]), str(rounds))  # fmt: skip
    table.notes.append(f"target: lowrank/plain at most {STEP_TARGET:.2f}")


def test_full_finetuning_peers_take_the_same_step():
    """Same trainable parameters, same loss, same weights after two steps."""
    models = {method: full_finetuning_model(method, TINY) for method in MEMORY_METHODS}
    params = {method: trainable_parameters(model) for method, model in models.items()}
    assert [p.shape for p in params["lowrank"]] == [p.shape for p in params["plain"]]
    assert sum(p.requires_grad for p in models["lowrank"].parameters()) == len(params["lowrank"])
    steps = {method: step_call(model, (2, 8), TINY) for method, model in models.items()}
    for _ in range(2):
        losses = {method: step() for method, step in steps.items()}
        torch.testing.assert_close(losses["lowrank"], losses["plain"], rtol=1e-6, atol=1e-6)
    for mine, plain in zip(params["lowrank"], params["plain"]):
        torch.testing.assert_close(mine, plain, rtol=1e-6, atol=1e-6)
    assert not torch.equal(params["plain"][0], llama(TINY).model.layers[0].self_attn.q_proj.weight)


def _memory(method: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_adapters", "--memory-step", method],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_full_finetuning_step_memory(summary_tables):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (VmHWM)")
    results = {method: _memory(method) for method in MEMORY_METHODS}
    table = summary_tables.table(
        f"Peak memory of one full fine-tuning step, {shape_label()}, {tokens_label(STEP_TOKENS)} tokens, fp32, AdamW: "
        "MB above the baseline (fresh process each)",
        ("method", "peak MB", "model MB", "trainable", "/ plain"),
    )
    for method, r in results.items():
        table.add_row(method, f"{r['peak_mb']:.0f}", f"{r['model_mb']:.0f}", str(r["trainable"]),
                      format_ratio(r["peak_mb"], results["plain"]["peak_mb"]))  # fmt: skip


def memory_step(method: str) -> dict:
    """One step of ``method`` in this process: VmHWM above the post-import baseline (see _memory_step)."""
    fixed_allocator()
    step_call(full_finetuning_model(method, TINY), (2, 8), TINY)()  # code pages, thread pools: the baseline
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    model = full_finetuning_model(method)
    step = step_call(model, STEP_TOKENS)
    gc.collect()
    model_kb = _status_kb("VmRSS") - baseline_kb
    _reset_peak()
    step()
    peak_kb = _status_kb("VmHWM") - baseline_kb
    trainable = sum(p.numel() for p in trainable_parameters(model))
    return {"method": method, "peak_mb": peak_kb / 1024, "model_mb": model_kb / 1024, "trainable": trainable}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Peak memory of one full fine-tuning step (one JSON line).")
    parser.add_argument("--memory-step", choices=MEMORY_METHODS, required=True)
    print(json.dumps(memory_step(parser.parse_args().memory_step)))
