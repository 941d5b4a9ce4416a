"""``lowrank generate``: the base model plus one or more saved adapters, sampling answers to prompts.

    lowrank generate --adapter lowrank-finetune/lora "Question: What is the capital of Drevaln?\\nAnswer:"
    lowrank generate --adapter lora=out/lora --adapter vera=out/vera --use lora,vera,__base__ "p1" "p2" "p3"

With several prompts over different adapters the prompts go through the model as one mixed batch
(``lowrank.mixed_batch``): the base weights are read once per step for all of them.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import lowrank

from . import model as _model
from .run import UsageError


@dataclass
class GenerateJob:
    prompts: list[str]
    adapters: list[str] = field(default_factory=list)  # "DIR" or "NAME=DIR"
    use: Optional[list[str]] = None  # one adapter name (or "__base__") per prompt, or one for all
    model: Optional[str] = None
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"

    def named_adapters(self) -> list[tuple[str, Path]]:
        out, seen = [], set()
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name or "adapter", spec
            if not name or name == "__base__" or name in seen:
                raise UsageError(f"--adapter: bad or repeated adapter name {name!r} in {spec!r} (use NAME=DIR)")
            if not Path(path).is_dir():
                raise UsageError(f"--adapter: no such adapter directory: {path}")
            seen.add(name)
            out.append((name, Path(path)))
        return out

    def rows(self, names: list[str]) -> list[str]:
        """The adapter of each prompt."""
        if not self.prompts:
            raise UsageError("prompts: give at least one prompt")
        use = self.use or ([names[0]] if names else ["__base__"])
        if len(use) == 1:
            use = use * len(self.prompts)
        if len(use) != len(self.prompts):
            raise UsageError(f"--use: expected one adapter name per prompt ({len(self.prompts)}) or one for all, got {len(use)}")
        for n in use:
            if n != "__base__" and n not in names:
                raise UsageError(f"--use: no adapter named {n!r}; loaded: {', '.join(names) or 'none'} (or __base__)")
        return use

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise UsageError(f"--max-new-tokens: expected a positive integer, got {self.max_new_tokens}")
        if not (self.temperature >= 0):
            raise UsageError(f"--temperature: expected >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top-p: expected a number in (0, 1], got {self.top_p}")
        if self.dtype not in ("fp32", "bf16"):
            raise UsageError(f"--dtype: expected fp32 or bf16, got {self.dtype!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is usable here")


def generate(job: GenerateJob) -> list[tuple[str, str, str]]:
    """``(adapter, prompt, completion)`` per prompt."""
    job.check()
    named = job.named_adapters()
    use = job.rows([n for n, _ in named])
    torch.manual_seed(job.seed)
    base, tokenizer, _ = _model.load(job.model, dtype=torch.bfloat16 if job.dtype == "bf16" else torch.float32)
    base = base.to(job.device)
    for name, path in named:
        lowrank.load_adapter(base, path, adapter_name=name)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer(job.prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(job.device)
    tokenizer.padding_side = side
    sample = job.temperature > 0
    kwargs = dict(max_new_tokens=job.max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=job.temperature, top_p=job.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        if len(set(use)) == 1:
            if use[0] == "__base__":
                with lowrank.disable_adapters(base) if named else contextlib.nullcontext():
                    out = base.generate(**batch, **kwargs)
            else:
                lowrank.set_adapter(base, use[0])
                out = base.generate(**batch, **kwargs)
        else:
            with lowrank.mixed_batch(base, use):
                out = base.generate(**batch, **kwargs)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return list(zip(use, job.prompts, texts))

