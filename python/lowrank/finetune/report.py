"""What a fine-tuning run reports: the table (rich), ``results.json`` and the loss-curve plot (matplotlib).

Both files are written to a temporary name and renamed into place, so an interrupted run never leaves
half a file. matplotlib is imported here only, when the plot is made; rich, when a table is printed
(as by the progress bar and the demo in run.py, and by lowrank.bench).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .train import MethodResult, perplexity

# Targets of the main job (issue 11); the table and results.json say whether each was met.
GAP_CLOSED_MIN = 0.30  # each adapter method closes >= 30 % of the base -> full held-out loss gap
QLORA_VS_LORA_MAX = 0.05  # QLoRA's held-out loss within 5 % of LoRA's
EM_LIFT_MIN = 30.0  # at least one method lifts exact match by 30 points
MEMORY_MAX = {"qlora": 0.35, "lora": 0.50}  # peak memory vs full fine-tuning


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result is an ordinary file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gap_closed(base_loss: float, full_loss: Optional[float], loss: float) -> Optional[float]:
    """The share of the base model's held-out loss above full fine-tuning's that a method removed."""
    if full_loss is None or not math.isfinite(base_loss) or base_loss - full_loss <= 1e-9:
        return None
    return (base_loss - loss) / (base_loss - full_loss)


def targets(base_loss: float, base_em: Optional[float], results: dict[str, MethodResult]) -> list[dict]:
    """Each target of the main job with what was measured and whether it was met (None: not measured)."""
    full = results.get("full")
    out = []
    for m in ("lora", "vera", "qlora"):
        if m in results:
            g = gap_closed(base_loss, full.loss_after if full else None, results[m].loss_after)
            out.append({"target": f"{m} closes >= {GAP_CLOSED_MIN:.0%} of the held-out loss gap to full fine-tuning",
                        "measured": None if g is None else round(g, 4), "met": None if g is None else g >= GAP_CLOSED_MIN})  # fmt: skip
    if "qlora" in results and "lora" in results:
        lora, q = results["lora"].loss_after, results["qlora"].loss_after
        rel = (q - lora) / lora if lora > 0 else float("inf")
        out.append({"target": f"qlora held-out loss within {QLORA_VS_LORA_MAX:.0%} of lora's",
                    "measured": f"{q:.4f} vs {lora:.4f} ({rel:+.1%})", "met": rel <= QLORA_VS_LORA_MAX})  # fmt: skip
    if base_em is not None:
        lifts = {m: r.em_after - base_em for m, r in results.items() if r.em_after is not None}
        if lifts:
            best = max(lifts, key=lifts.get)
            out.append({"target": f"some method lifts held-out exact match by >= {EM_LIFT_MIN:.0f} points",
                        "measured": f"{best}: {lifts[best]:+.1f} points", "met": lifts[best] >= EM_LIFT_MIN})  # fmt: skip
    if full is not None and full.peak_bytes:
        for m, limit in MEMORY_MAX.items():
            if m in results and results[m].peak_bytes:
                ratio = results[m].peak_bytes / full.peak_bytes
                out.append({"target": f"{m} peak memory <= {limit}x full fine-tuning's",
                            "measured": round(ratio, 3), "met": ratio <= limit})  # fmt: skip
    return out


def _mb(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _em(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.0f} %"


def print_table(console, meta: dict, base_loss: float, base_em: Optional[float], results: dict[str, MethodResult]) -> None:
    from rich.table import Table

    full = results.get("full")
    table = Table(title=f"{meta['model']} on {meta['data']}", title_justify="left")
    for col, just in [("method", "left"), ("trainable", "right"), ("adapter file", "right"), ("peak memory", "right"),
                      ("s/step", "right"), ("tokens/s", "right"), ("held-out loss (ppl)", "right"),
                      ("gap closed", "right"), ("exact match", "right")]:  # fmt: skip
        table.add_column(col, justify=just)
    table.add_row("base model", "—", "—", "—", "—", "—", f"{base_loss:.3f} ({perplexity(base_loss):,.1f})", "—", _em(base_em))
    for m, r in results.items():
        ratio = f" ({r.peak_bytes / full.peak_bytes:.2f}×)" if full and full.peak_bytes and r.peak_bytes else ""
        g = gap_closed(base_loss, full.loss_after if full else None, r.loss_after)
        table.add_row(
            m, f"{r.trainable:,} ({100 * r.trainable / r.total:.2f} %)", _mb(r.adapter_bytes), _mb(r.peak_bytes) + ratio,
            f"{r.seconds_per_step:.2f}", f"{r.tokens_per_s:,.0f}",
            f"{base_loss:.3f} → {r.loss_after:.3f} ({perplexity(r.loss_after):,.2f})",
            "—" if g is None else f"{g:.0%}", f"{_em(base_em)} → {_em(r.em_after)}",
        )  # fmt: skip
    console.print(table)
    console.print(f"[dim]{meta['machine']}; {meta['settings']}; peak memory: the method's tensors + optimizer state "
                  "+ the most one step adds (× full fine-tuning's)[/dim]")  # fmt: skip


def print_targets(console, rows: list[dict]) -> None:
    for row in rows:
        mark = "[green]met[/green]" if row["met"] else "[red]MISSED[/red]" if row["met"] is False else "[yellow]not measured[/yellow]"
        console.print(f"  {mark}  {row['target']}: {row['measured']}")


def write_json(path: Path, payload: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def results_payload(meta: dict, base_loss: float, base_em: Optional[float], results: dict[str, MethodResult],
                    target_rows: list[dict], demo: Optional[dict] = None) -> dict:  # fmt: skip
    return {
        **meta,
        "base": {"heldout_loss": base_loss, "perplexity": perplexity(base_loss), "exact_match": base_em},
        "methods": {m: {**asdict(r), "perplexity_after": perplexity(r.loss_after)} for m, r in results.items()},
        "targets": target_rows,
        "demo": demo or {},
    }


def plot(path: Path, results: dict[str, MethodResult], base_loss: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for m, r in results.items():
        line = ax.plot(range(1, len(r.losses) + 1), r.losses, label=f"{m} (train)", linewidth=1.6)[0]
        ax.axhline(r.loss_after, color=line.get_color(), linestyle=":", linewidth=1.2)
    ax.axhline(base_loss, color="0.4", linestyle="--", linewidth=1.0, label="held-out, base model")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("completion loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="dotted: held-out loss after", title_fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png")

    try:
        _atomic_write(path, write)
    finally:
        plt.close(fig)
