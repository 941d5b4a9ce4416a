"""Whole models (LoRA, QLoRA, VeRA, full fine-tuning) trained and run under each extreme of the
measured decisions (ops/_dispatch.py), pinned.

Which code path a layer takes depends on what this machine measured: the fused row kernels or the GEMMs,
bf16 GEMMs native or widened, the adapter-products kernel, tile products through an [n, M] buffer or
straight into rows. Each path is tested against float64 on its own (test_lora_ops, test_nf4_ops, ...);
this file tests how they meet the rest of a model: the outputs' layouts and dtypes going into lowrank's
norms, SiLU products and attention (fast_decoder) and pointwise recompute. A bf16 QLoRA MLP whose
products came back as transposed views once trained on NaN on a machine that measured the buffer
faster — the wrapper of the SiLU product let its row copies go before the kernel read them — and only a
finetune test on that machine saw it. Here every combination runs on every machine.

Each pinned model, with fast_decoder (and in training under PointwiseRecompute), gives the loss and
gradients, or the logits, of the same model on transformers' own modules with the simplest paths pinned
(GEMMs, rows)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import lowrank
from lowrank.ops import _dispatch, _runtime
from lowrank.ops import nf4 as nf4_ops

from conftest import assert_same_training, dtype_name, tiny_adapted_llama, token_ids

transformers = pytest.importorskip("transformers")

ALWAYS, NEVER = 1 << 30, 0
DTYPES = (torch.float32, torch.bfloat16)


def _pin(monkeypatch, *, kernels: bool, buffer: bool, native_bf16: bool) -> None:
    """Every decision pinned: the few-token kernels at any M (``kernels``) or never, tile buffers at any M
    or never, torch's bf16 GEMM native or widened."""
    limit = ALWAYS if kernels else NEVER
    both = lambda v: {torch.float32: v, torch.bfloat16: v}  # noqa: E731
    monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", both(limit))
    monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_MAX_M", both(limit))
    monkeypatch.setattr(_runtime, "NF4_CPU_FUSED_MAX_M", limit)
    monkeypatch.setattr(_runtime, "NF4_CPU_INPUT_GRAD_MAX_M", limit)
    monkeypatch.setattr(_runtime, "CPU_ADAPTER_PRODUCTS", both(kernels))
    for name in ("CPU_LORA_BF16_DOT", "CPU_INPUT_GRAD_BF16_DOT", "NF4_CPU_BF16_DOT", "NF4_CPU_INPUT_GRAD_BF16_DOT"):
        monkeypatch.setattr(_runtime, name, kernels)  # (a kernel variant without the products widens itself)
    monkeypatch.setattr(_runtime, "CPU_TILE_BUFFER_MAX_M", both(ALWAYS if buffer else NEVER))
    # NF4 inference: the tiled layout at any M (bf16 x widened up to M = 2), or never
    monkeypatch.setattr(_runtime, "NF4_CPU_TILED_M", (1, ALWAYS, 2) if kernels else (0, 0, 0))
    decision = _dispatch.Decision("native" if native_bf16 else "widen", "pinned")
    monkeypatch.setitem(_dispatch._decisions, "cpu_bf16_gemm", decision)


PINS = {
    "gemms-rows": dict(kernels=False, buffer=False, native_bf16=False),
    "gemms-buffers-native": dict(kernels=False, buffer=True, native_bf16=True),
    "gemms-buffers-widened": dict(kernels=False, buffer=True, native_bf16=False),
    "kernels-buffers-native": dict(kernels=True, buffer=True, native_bf16=True),
}


def _model(method: str, dtype: torch.dtype) -> torch.nn.Module:
    return tiny_adapted_llama(dtype, {
        "lora": lambda: lowrank.LoRAConfig(r=4, alpha=8),
        "qlora": lambda: lowrank.QLoRAConfig(r=4, alpha=8, quantize_base="all-linear"),
        "vera": lambda: lowrank.VeRAConfig(r=32),
        "full": lambda: lowrank.FullConfig(),
    }[method]())


def _train(model, ids, recompute: bool) -> list:
    model.train()
    with lowrank.PointwiseRecompute() if recompute else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("pins", list(PINS), ids=str)
@pytest.mark.parametrize("method", ["lora", "qlora", "vera", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_fast_decoder_trains_alike_under_every_decision(monkeypatch, dtype, method, pins):
    base = _model(method, dtype)
    fast = lowrank.fast_decoder(copy.deepcopy(base))
    for tokens in ((2, 40), (1, 3)):  # many tokens (GEMMs, tiles) and few (the row kernels where pinned)
        ids = token_ids(7, tokens)
        with monkeypatch.context() as m:
            _pin(m, **PINS["gemms-rows"])
            want = _train(base, ids, recompute=False)
        with monkeypatch.context() as m:
            _pin(m, **PINS[pins])
            got = _train(fast, ids, recompute=True)
        assert all(torch.isfinite(t.float()).all() for t in got), (pins, tokens)
        assert_same_training(got, want, dtype)


@pytest.mark.parametrize("pins", list(PINS), ids=str)
@pytest.mark.parametrize("method", ["lora", "qlora", "vera"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_inference_alike_under_every_decision(monkeypatch, dtype, method, pins):
    """Inference (eval, no gradients) through fast_decoder under each pinned extreme: the row kernels and
    NF4's tiled layout, or the GEMMs; each call twice (the second through the layers' CallPlans)."""
    base = _model(method, dtype).eval()
    fast = lowrank.fast_decoder(copy.deepcopy(base)).eval()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for tokens in ((1, 1), (1, 2), (2, 5), (2, 40)):
        ids = token_ids(11, tokens)
        with torch.no_grad():
            with monkeypatch.context() as m:
                _pin(m, **PINS["gemms-rows"])
                want = base(input_ids=ids).logits.float()
            with monkeypatch.context() as m:
                _pin(m, **PINS[pins])
                for _ in range(2):
                    got = fast(input_ids=ids).logits.float()
                    assert torch.isfinite(got).all(), (pins, tokens)
                    assert torch.allclose(got, want, **tol), (pins, tokens, (got - want).abs().max().item())
    if method == "qlora" and PINS[pins]["kernels"] and nf4_ops.TiledWeight.supported((64, 64), 64, dtype):
        frozen = [getattr(mod, "_frozen", None) for mod in fast.modules()]
        assert any(getattr(f, "tiled", None) is not None for f in frozen)  # the tiled layout did run
