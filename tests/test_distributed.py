"""The model-level adapter API under torch.distributed, on CPU with the gloo backend, in two processes.

- DDP: LoRA injected into a model wrapped by ``DistributedDataParallel``; each rank takes half the
  batch. After one backward the (all-reduced, averaged) adapter gradients equal those of one process
  taking the mean loss over the whole batch, and after one AdamW step the adapter parameters agree
  between the ranks and with that process.
- FSDP2: a Llama (built from config) with LoRA injected, ``fully_shard`` per decoder layer and then the
  root, trained a few steps: the loss is finite and falls, the adapter parameters move, the frozen base
  weights stay bit-for-bit, and the result matches one unsharded process on the full batch.

The workers run in processes started with the "spawn" method (``torch.multiprocessing.spawn``), each
with one thread, rendezvousing over TCP on 127.0.0.1 at a free port; they hand their results back as
files in ``tmp_path`` (``torch.save``: files this test wrote itself).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowrank

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
LORA = dict(r=4, alpha=8, target_modules="all-linear")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args) -> None:
    """Runs ``worker(rank, port, *args)`` in WORLD spawned processes; raises (with the worker's
    traceback) if any of them fails. Retries once with a new port if the free one was taken meanwhile."""
    for attempt in range(2):
        try:
            mp.spawn(worker, args=(_free_port(), *args), nprocs=WORLD, join=True)
            return
        except mp.ProcessRaisedException as e:
            if attempt == 1 or "address already in use" not in str(e).lower():
                raise


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    # Every rank on the built-in code paths: ranks that measure them at once, on shared cores, can choose
    # differently (one oneDNN's fp32 GEMM, the other torch.mm's) and then differ from the single process
    # by more than the comparison's 1e-6 (seen with the machine busy).
    os.environ["LOWRANK_CALIBRATION"] = "off"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"  # loopback only
    # a short timeout: a rank that dies fails the other's collectives in a minute, not half an hour
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method="env://",
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip


def _teardown() -> None:
    """Both ranks leave together: a rank that tore its gloo group down while the other was still working
    (rank 0 computes the single-process reference alone) died now and then in gloo's teardown with
    "terminate called without an active exception" (SIGABRT), seen with the machine busy."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _randomize_adapters(model, seed=1) -> None:
    """Nonzero B (LoRA starts it at zeros) so A gets gradients; the same values in every process."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.adapter_parameters(model):
            torch.nn.init.normal_(p, std=0.02)


def _adapter_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in lowrank.adapter_parameters(model)}


def _adapter_values(model) -> dict:
    return {n: p.detach().clone() for n, p in lowrank.adapter_parameters(model)}


def _assert_close(got: dict, want: dict, what: str, rtol: float, atol_rel: float) -> None:
    """Every tensor equal within ``rtol`` plus ``atol_rel`` x the largest |value| of the whole set."""
    assert got.keys() == want.keys(), what
    scale = max(t.abs().max().item() for t in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol_rel * scale,
                                   msg=lambda m: f"{what}: {name}: {m}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------
DDP_BATCH, DDP_IN, DDP_OUT = 8, 32, 16


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(DDP_IN, 48), torch.nn.GELU(), torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, DDP_OUT)
    )
    lowrank.inject(model, lowrank.LoRAConfig(**LORA))
    _randomize_adapters(model)
    return model


def _ddp_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(DDP_BATCH, DDP_IN, generator=g), torch.randn(DDP_BATCH, DDP_OUT, generator=g)


def _mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)  # mean over this batch's elements


def _step(model) -> None:
    """One AdamW step on the adapter's parameters (their .grad as left by the backward)."""
    torch.optim.AdamW([p for _, p in lowrank.adapter_parameters(model)], lr=1e-2, weight_decay=0.01).step()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        model = _mlp()
        base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _ddp_data()
        half = DDP_BATCH // WORLD
        xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        loss = _mse(ddp, xs, ys)
        loss.backward()
        result = {"loss": loss.detach(), "grads": _adapter_grads(model)}
        result["base_grads_none"] = all(p.grad is None for p in model.parameters() if not p.requires_grad)
        _step(model)
        result["after"] = _adapter_values(model)
        result["base_unchanged"] = all(
            torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad
        )
        if rank == 0:  # the single-process reference: the same model, the whole batch, no DDP
            ref = _mlp()
            ref_loss = _mse(ref, x, y)
            ref_loss.backward()
            result["ref_loss"], result["ref_grads"] = ref_loss.detach(), _adapter_grads(ref)
            _step(ref)
            result["ref_after"] = _adapter_values(ref)
        torch.save(result, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        _teardown()


def test_ddp_lora_gradients_and_step_match_single_process(tmp_path):
    _spawn(_ddp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD))

    # the ranks really saw different data, and their mean loss is the full batch's
    assert not torch.allclose(r0["loss"], r1["loss"])
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, r0["ref_loss"], rtol=1e-6, atol=0)

    for r in (r0, r1):
        assert r["base_grads_none"] and r["base_unchanged"]
        assert len(r["grads"]) == 2 * 3  # lora_A, lora_B of the three linears
        assert all(g.abs().max() > 0 for g in r["grads"].values())

    # DDP's all-reduced (averaged) gradients: the same on both ranks, and the full batch's mean-loss gradient
    _assert_close(r1["grads"], r0["grads"], "grads rank1 vs rank0", rtol=0, atol_rel=0)
    _assert_close(r0["grads"], r0["ref_grads"], "DDP grads vs single process", rtol=1e-6, atol_rel=1e-6)

    # one AdamW step: the ranks stay identical and agree with the single process
    _assert_close(r1["after"], r0["after"], "params after step rank1 vs rank0", rtol=0, atol_rel=0)
    _assert_close(r0["after"], r0["ref_after"], "params after step vs single process", rtol=1e-6, atol_rel=1e-6)


# ---------------------------------------------------------------------------------------------
# FSDP2 (fully_shard)
# ---------------------------------------------------------------------------------------------
FSDP_BATCH, FSDP_SEQ, FSDP_STEPS, VOCAB = 4, 12, 4, 100


def _llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    lowrank.inject(model, lowrank.LoRAConfig(**LORA))
    _randomize_adapters(model)
    return model


def _lm_data():
    return torch.randint(0, VOCAB, (FSDP_BATCH, FSDP_SEQ), generator=torch.Generator().manual_seed(11))


LR = 1e-2


def _train(model, ids, steps) -> tuple[list, dict]:
    """``steps`` AdamW steps on the adapter of ``model`` (the same batch each time): the losses, and the
    adapter gradients of the first backward (full tensors)."""
    opt = torch.optim.AdamW([p for _, p in lowrank.adapter_parameters(model)], lr=LR)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss  # mean over tokens: every rank has as many
        loss.backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in lowrank.adapter_parameters(model)}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, first_grads


def _full(t):
    """A parameter as a plain full tensor (FSDP2 holds sharded DTensors outside forward/backward)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    try:
        model = _llama()
        base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapter_before = _adapter_values(model)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = {n: type(p).__name__ for n, p in lowrank.adapter_parameters(model)}

        ids = _lm_data()
        half = FSDP_BATCH // WORLD
        losses, grads = _train(model, ids[rank * half : (rank + 1) * half], FSDP_STEPS)

        result = {
            "losses": torch.stack(losses),
            "grads": grads,
            "sharded": sharded,
            "adapter_before": adapter_before,
            "adapter_after": {n: _full(p) for n, p in lowrank.adapter_parameters(model)},
            "base_before": base_before,
            "base_after": {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad},
        }
        if rank == 0:  # the single-process reference: the same model unsharded, the whole batch
            ref = _llama()
            ref_losses, result["ref_grads"] = _train(ref, ids, FSDP_STEPS)
            result["ref_losses"] = torch.stack(ref_losses)
            result["ref_after"] = _adapter_values(ref)
        torch.save(result, os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        _teardown()


def test_fsdp2_fully_shard_trains_lora(tmp_path):
    pytest.importorskip("transformers")
    _spawn(_fsdp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD))

    # fully_shard turned the adapter parameters into DTensors (they really are sharded)
    assert set(r0["sharded"].values()) == {"DTensor"}, r0["sharded"]

    for r in (r0, r1):
        losses = r["losses"]
        assert torch.isfinite(losses).all(), losses
        assert losses[-1] < losses[0], losses
        # the frozen base (embeddings, norms, every base_layer) is untouched, bit for bit
        assert r["base_after"].keys() == r["base_before"].keys() and len(r["base_after"]) > 0
        for n, w in r["base_after"].items():
            assert torch.equal(w, r["base_before"][n]), f"base weight {n} changed"
        # every adapter tensor moved
        for n, w in r["adapter_after"].items():
            assert not torch.equal(w, r["adapter_before"][n]), f"adapter {n} did not change"

    # FSDP2's reduce-scattered (averaged) first gradients are the full batch's mean-loss gradient
    _assert_close(r1["grads"], r0["grads"], "FSDP grads rank1 vs rank0", rtol=0, atol_rel=0)
    _assert_close(r0["grads"], r0["ref_grads"], "FSDP grads vs single process", rtol=1e-5, atol_rel=1e-6)
    # both ranks hold the same adapter; it is the one a single process trains on the full batch
    _assert_close(r1["adapter_after"], r0["adapter_after"], "FSDP adapter rank1 vs rank0", rtol=0, atol_rel=0)
    torch.testing.assert_close((r0["losses"] + r1["losses"]) / 2, r0["ref_losses"], rtol=1e-5, atol=0)
    # Adam divides each gradient by its own running size, so an element whose gradient is near zero can
    # move by a good part of lr on a rounding-level gradient difference (seen: 9e-6 after 4 steps, lr=1e-2):
    # compare the weights to 1% of one step's largest move
    for n, w in r0["ref_after"].items():
        torch.testing.assert_close(r0["adapter_after"][n], w, rtol=0, atol=1e-2 * LR, msg=lambda m: f"FSDP adapter {n}: {m}")
