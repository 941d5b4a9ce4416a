#!/usr/bin/env bash
# One-shot GPU check (for a borrowed GPU machine with torch+CUDA, nvcc, scikit-build-core, pybind11
# already installed and no package registry): build, run the CUDA tests, print a benchmark table.
#   bash scripts/gpu_check.sh            (prints the table last; writes $OUT/gpu_check.log if OUT is set)
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "== build"
  python3 -m pip install -q --no-build-isolation --no-deps . || exit 1
  python3 -m lowrank info
  echo "== CUDA tests"
  python3 -m pytest -q -x tests -k "cuda" -p no:cacheprovider
  echo "== benchmark"
  python3 scripts/gpu_bench.py
} 2>&1 | tee "$log"
