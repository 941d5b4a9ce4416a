"""pytest wiring for the benchmarks: collect ``bench_*.py``, and print the interleaved summary tables.

``pytest benchmarks/`` from the repository root runs every ``bench_*.py`` here with pytest-benchmark
(the repo's pytest settings only collect ``test_*.py`` under tests/, so this directory collects its
own files). Tests that compare peers interleaved add rows to a table through the ``summary_tables``
fixture; the tables are printed once, at the end of the run, after pytest-benchmark's report.
Kernel outputs are never NaN-poisoned here, even when tests/ runs in the same session.
"""

from __future__ import annotations

import pytest

from lowrank.ops import _runtime

from ._report import SummaryTables

_SUMMARY_TABLES = pytest.StashKey[SummaryTables]()


def pytest_collect_file(file_path, parent):
    # A path given on the command line is collected by pytest itself whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.stash[_SUMMARY_TABLES] = SummaryTables()


@pytest.fixture(autouse=True)
def _no_output_poisoning(monkeypatch):
    # tests/conftest.py turns poisoning on for the whole process; an extra fill per output is not
    # part of what is timed.
    monkeypatch.setattr(_runtime, "poison_outputs", False)


@pytest.fixture(scope="session")
def summary_tables(pytestconfig) -> SummaryTables:
    """The run's summary tables; ``summary_tables.table(title, columns).add_row(...)``."""
    return pytestconfig.stash[_SUMMARY_TABLES]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    tables = [table for table in config.stash.get(_SUMMARY_TABLES, SummaryTables()) if table.rows]
    if not tables:
        return
    terminalreporter.write_sep("=", "interleaved summary (median per call)")
    for table in tables:
        terminalreporter.write(table.render())
