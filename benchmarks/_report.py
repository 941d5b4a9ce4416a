"""Summary tables the benchmarks fill in and pytest prints at the end of the run.

A test adds rows to a :class:`SummaryTable` (got from the ``summary_tables`` fixture,
benchmarks/conftest.py); the terminal-summary hook prints every table after pytest-benchmark's own
output, rendered with ``rich`` when it is installed and as aligned plain text otherwise. Rows
appear in the order the tests ran, so ``-k`` selections give partial tables.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from lowrank.bench import format_ms, format_ratio  # noqa: F401  (the cells `lowrank bench` prints, shared)

_DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_label(dtype: torch.dtype) -> str:
    """Short dtype name for test ids and tables: ``fp32``, ``bf16``."""
    return _DTYPE_LABELS.get(dtype, str(dtype).removeprefix("torch."))


def format_rate(amount: float, seconds: Optional[float], unit: float = 1e9) -> str:
    """``amount / seconds`` in units of ``unit`` (GB/s, GFLOP/s by default)."""
    return "—" if seconds is None else f"{amount / seconds / unit:.1f}"


@dataclass
class SummaryTable:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed under the table

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"cells: expected {len(self.columns)} ({', '.join(self.columns)}), got {len(cells)}")
        self.rows.append(tuple(cells))

    def render(self) -> str:
        try:
            import rich  # noqa: F401
        except ImportError:
            return self._render_plain()
        return self._render_rich()

    def _render_rich(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        buffer = io.StringIO()
        console = Console(file=buffer, width=200, force_terminal=False, color_system=None)
        console.print(self.title, highlight=False)
        console.print(table)
        for note in self.notes:
            console.print(note, highlight=False)
        return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())

    def _render_plain(self) -> str:
        widths = [max(len(cell) for cell in column) for column in zip(self.columns, *self.rows)]

        def line(cells):
            first, *rest = cells
            return "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])])

        lines = [self.title, line(self.columns), "  ".join("-" * w for w in widths)]
        lines += [line(row) for row in self.rows] + self.notes
        return "\n".join(lines) + "\n"


class SummaryTables:
    """The run's tables by title, in the order they were first asked for."""

    def __init__(self) -> None:
        self._tables: dict[str, SummaryTable] = {}

    def table(self, title: str, columns: tuple[str, ...]) -> SummaryTable:
        table = self._tables.setdefault(title, SummaryTable(title, columns))
        if table.columns != columns:
            raise ValueError(f"columns: table {title!r} already has {table.columns}, got {columns}")
        return table

    def __iter__(self) -> Iterator[SummaryTable]:
        return iter(self._tables.values())


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (lowrank._info.cpu_model)."""
    from lowrank._info import cpu_model

    return cpu_model()
