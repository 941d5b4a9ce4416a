"""Peak memory of one training step, measured in a fresh process (``python -m benchmarks._memory_step``).

A stack of ``--layers`` Linear(``--width``, ``--width``) layers, no bias, fp32, ``--tokens`` rows of
input: forward, an MSE loss, backward, one AdamW step. Methods:

    full          dense nn.Linear layers, all weights trainable (full fine-tuning)
    lora          lowrank.LoRALinear (r=16) over frozen dense weights
    peft-lora     PEFT's LoRA layer (r=16) over the same
    qlora         lowrank.QLoRALinear (r=16) over NF4 weights
    peft-qlora    PEFT's LoRA over bitsandbytes Linear4bit (nf4, double quantization)

Printed (one JSON line): the step's peak resident memory above the post-import baseline, in MB (after
a tiny warm-up step of the same method, so code pages and thread pools are in the baseline). The
peak counter (VmHWM) is reset after the model is built (``/proc/self/clear_refs``), so the transient
dense weights a 4-bit model is quantized from do not count; the model's own memory does.

Every measuring process first fixes glibc's mmap threshold (:func:`fixed_allocator`): each allocation
of 64 KiB or more is its own mmap, returned to the system when freed, so the resident size follows the
memory in use. With glibc's adaptive default, freed blocks up to 32 MB stay in the heap once a larger
one has been freed, and the reading depended on the process's history: the same PEFT LoRA step of
the whole-model benchmark read 1451 MB in one fresh process and 1946 MB in another (live: 1437 MB).
"""

from __future__ import annotations

import argparse
import json

from lowrank._proc import fix_mmap_threshold, reset_peak, status_kb

from ._peers import peft_lora_layer


def _status_kb(field: str) -> int:
    kb = status_kb(field)
    if kb is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kb


def fixed_allocator() -> None:
    """Large allocations each get their own mmap from now on (see the module docstring)."""
    if not fix_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold (mallopt)")


def _reset_peak() -> None:
    if not reset_peak():
        raise RuntimeError("cannot reset the peak through /proc/self/clear_refs")


def build(method: str, width: int, layers: int, rank: int):
    import torch
    from torch import nn

    import lowrank

    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        dense = nn.Linear(width, width, bias=False)
        if method == "full":
            blocks.append(dense)
        elif method == "lora":
            blocks.append(lowrank.LoRALinear.from_linear(dense, r=rank, alpha=2 * rank))
        elif method == "qlora":
            blocks.append(lowrank.QLoRALinear.from_linear(dense, r=rank, alpha=2 * rank))
            del dense
        elif method == "peft-lora":
            from peft.tuners.lora.layer import Linear

            dense.requires_grad_(False)
            blocks.append(peft_lora_layer(Linear, dense, rank, 2 * rank))
        elif method == "peft-qlora":
            import bitsandbytes as bnb
            from peft.tuners.lora.bnb import Linear4bit

            q = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                                  quant_type="nf4")  # fmt: skip
            q.load_state_dict(dense.state_dict())
            q = q.to("cpu")  # quantizes
            q.requires_grad_(False)
            del dense
            blocks.append(peft_lora_layer(Linear4bit, q, rank, 2 * rank))
        else:
            raise ValueError(f"method: unknown {method!r}")
    model = nn.Sequential(*blocks)
    if method != "full":
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import gc

    fixed_allocator()
    import torch

    import lowrank  # noqa: F401  (imported before the baseline: its import is not the step's memory)

    if args.method.startswith("peft"):
        import peft  # noqa: F401
    if args.method == "peft-qlora":
        import bitsandbytes  # noqa: F401
    def step(model, x, target):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # A tiny step of the same method first: the code pages, thread pools and caches a first call
    # touches are part of the process, not of this step's data.
    step(build(args.method, 128, 2, 4), torch.randn(8, 128), torch.randn(8, 128))
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.width)
    target = torch.randn(args.tokens, args.width)
    gc.collect()
    baseline_kb = _status_kb("VmRSS")

    model = build(args.method, args.width, args.layers, args.rank)
    gc.collect()
    model_kb = _status_kb("VmRSS") - baseline_kb
    _reset_peak()
    step(model, x, target)

    peak_kb = _status_kb("VmHWM") - baseline_kb
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"method": args.method, "peak_mb": peak_kb / 1024, "model_mb": model_kb / 1024,
                      "trainable": trainable}))  # fmt: skip


if __name__ == "__main__":
    main()
