"""The fine-tuning data: a built-in domain the base model cannot know, or the user's own file.

The built-in set is generated here, from a seed (no text copied from anywhere): invented countries and
their invented capitals, asked in several phrasings. Training uses four phrasings per fact; the
held-out evaluation asks the same facts in two phrasings never seen in training, so a method has to
learn the facts, not the sentences. A pretrained model answers 0 % of them before fine-tuning.

``--data`` takes JSONL (one ``{"prompt": ..., "completion": ...}`` per line) or plain text (one
example per non-empty line, the loss on the whole line, no exact-match score); a fixed shuffle puts
20 % of the examples aside for evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m"]

TRAIN_TEMPLATES = (
    "What is the capital of {e}?",
    "Name the capital city of {e}.",
    "Which city is the seat of government of {e}?",
    "In {e}, what city serves as the capital?",
)
EVAL_TEMPLATES = (
    "Tell me the capital of {e}.",
    "The capital of {e} is which city?",
)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass
class Dataset:
    name: str
    train: list[Example]
    eval: list[Example]
    exact_match: bool = True  # prompts ask for a short answer that greedy decoding can match
    notes: list[str] = field(default_factory=list)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def builtin(seed: int = 0, facts: int = 24) -> Dataset:
    """``facts`` invented countries with invented capitals; 4 training and 2 held-out phrasings each."""
    rng = random.Random(seed)
    names: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = _word(rng, syllables)
            if w not in names and 4 <= len(w) <= 12:
                names.add(w)
                return w

    pairs = [(fresh(3), fresh(2)) for _ in range(facts)]
    train = [Example(_prompt(t.format(e=c)), f" {cap}") for c, cap in pairs for t in TRAIN_TEMPLATES]
    held = [Example(_prompt(t.format(e=c)), f" {cap}") for c, cap in pairs for t in EVAL_TEMPLATES]
    return Dataset(
        name=f"built-in: capitals of {facts} invented countries (seed {seed})",
        train=train,
        eval=held,
        notes=[f"train: {len(TRAIN_TEMPLATES)} phrasings per fact; held out: {len(EVAL_TEMPLATES)} other phrasings"],
    )


class DataError(ValueError):
    """A --data file that cannot be used (the CLI prints it as one line)."""


def from_file(path: str | Path, seed: int = 0) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark (Windows editors write one)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data: cannot read {path}: {e}") from None
    examples: list[Example] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--data: {path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                row.get("completion"), str
            ):
                raise DataError(f'--data: {path}:{number}: expected {{"prompt": str, "completion": str}}')
            if not row["completion"]:
                raise DataError(f"--data: {path}:{number}: empty completion")
            examples.append(Example(row["prompt"], row["completion"]))
        exact = True
    else:
        examples = [Example("", line.strip()) for line in text.splitlines() if line.strip()]
        exact = False
    if len(examples) < 5:
        raise DataError(f"--data: {path}: expected at least 5 examples, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, len(examples) // 5)
    held = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return Dataset(name=str(path), train=train, eval=held, exact_match=exact)
