#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh [DIR] [-- PYTEST_ARGS...]
#
# Builds a CPU-only wheel with LOWRANK_SANITIZE=ON (-fsanitize=address,undefined, -O1 -g, CUDA off)
# into DIR (default /tmp/lowrank-sanitize), installs it into DIR/site with --target (the active
# environment is not touched; it needs torch and pytest, as for the normal tests), then runs the kernel tests against it with libasan preloaded into the
# Python process. Any ASan or UBSan report aborts the run, so a non-zero exit is a finding.
#
# Which tests: everything after `--` goes to pytest verbatim, e.g.
#   scripts/sanitize.sh /tmp/lowrank-sanitize -- tests/test_nf4_ops.py -k "not compile"
# or, without `--`, the environment: LOWRANK_SANITIZE_TESTS (space-separated files / node ids) and
# LOWRANK_SANITIZE_K (a pytest -k expression). The defaults are the kernel-op tests and the whole-model
# decision sweep (every path a measurement may choose, through fast_decoder), minus
# torch.compile (slow, and nothing of ours that the op tests do not already run).
# The build directory is kept in DIR/build, so a second run only recompiles what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

dir=/tmp/lowrank-sanitize
if [ $# -gt 0 ] && [ "$1" != "--" ]; then dir=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
if [ $# -gt 0 ]; then
  pytest_args=("$@")
else
  read -r -a pytest_args <<<"${LOWRANK_SANITIZE_TESTS:-tests/test_lora_ops.py tests/test_adapter_products.py tests/test_lora_layer.py tests/test_nf4_ops.py tests/test_nf4_tiled.py tests/test_call_plan.py tests/test_attention.py tests/test_norm.py tests/test_swiglu.py tests/test_vera_ops.py tests/test_mixed.py tests/test_loss.py tests/test_validate.py tests/test_info.py tests/test_decision_sweep.py}"
  pytest_args+=(-k "${LOWRANK_SANITIZE_K:-not compile}")
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

echo "== sanitized CPU-only build (LOWRANK_SANITIZE=ON) into $dir"
start=$SECONDS
rm -rf "$dir/wheel" "$dir/site"
# install.strip=false: keep the -g debug info, so reports name the kernel source file and line.
LOWRANK_CUDA=OFF LOWRANK_SANITIZE=ON python -m pip wheel -q --no-deps -w "$dir/wheel" \
  -C build-dir="$dir/build" -C install.strip=false "$root"
python -m pip install -q --no-deps --target "$dir/site" "$dir"/wheel/lowrank-*.whl
echo "build + install took $((SECONDS - start)) s"

# The module links the shared sanitizer runtimes (gcc: libasan.so.8 and libubsan.so.1). ASan's must be
# the first library in the process, so it is preloaded; libubsan comes in as the module's own dependency.
# libstdc++ is preloaded right after it: python is a C program, so otherwise libstdc++ arrives only with
# torch, after ASan has started, and ASan's __cxa_throw interceptor finds no real __cxa_throw: the
# first C++ exception anywhere (torch throws and catches some while bitsandbytes imports) then dies in
# "CHECK failed: asan_interceptors.cpp ... real___cxa_throw != 0".
cxx=${CXX:-g++}
libasan=$($cxx -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "no libasan.so from $cxx -print-file-name (install the gcc sanitizer runtimes)"; exit 1; }
libstdcxx=$(readlink -f "$($cxx -print-file-name=libstdc++.so)")
libasan=$(readlink -f "$libasan")
so=$(ls "$dir"/site/lowrank/_C*.so)
ldd "$so" | grep libasan >/dev/null || { echo "$so does not link libasan: not a sanitized build?"; exit 1; }

export PYTHONPATH="$dir/site"
export LD_PRELOAD="$libasan $libstdcxx"
# detect_leaks=0: CPython and torch keep their allocations until exit by design.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LOWRANK_EXPECT_CPU_ONLY=1
# Calibration would time probe shapes of 4096 x 4096 at -O1 under ASan (minutes); the tests force the
# fused and GEMM paths themselves. The built-in defaults also run the bf16 "widen" GEMM path on every
# machine, which calibration on a CPU with a fast bf16 GEMM would otherwise skip.
export LOWRANK_CALIBRATION=off

python - <<'PY'
import os, lowrank
from lowrank import _C
site = os.environ["PYTHONPATH"]
assert _C.__file__.startswith(site), f"imported {_C.__file__}, not the sanitized build in {site}"
info = lowrank.info()
assert info["cuda_kernels_compiled"] is False, info
print("sanitized build imports:", _C.__file__, "| CPU variants here:", info["cpu_variants_supported"])
PY

echo "== pytest ${pytest_args[*]}"
start=$SECONDS
# --capture=sys: pytest captures Python's sys.stdout/err only, so a sanitizer report (written to file
# descriptor 2 just before the abort) reaches the terminal instead of dying in pytest's capture file.
# -rfEx: the summary lists failures, errors and xfails, not the CUDA-only tests skipped by the thousand.
python -m pytest -q -p no:cacheprovider --capture=sys -rfEx "${pytest_args[@]}"
echo "sanitized tests took $((SECONDS - start)) s: no ASan/UBSan report"
