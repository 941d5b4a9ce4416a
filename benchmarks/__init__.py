"""lowrank's benchmark suite: ``pytest benchmarks/`` (see conftest.py and each ``bench_*.py``).

A package so that pytest imports ``benchmarks.conftest`` under its own name: tests/ modules import
their helpers ``from conftest``, which a second top-level ``conftest`` would shadow in a run that
collects both directories.
"""
