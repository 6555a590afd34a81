#!/usr/bin/env bash
# GPU check of the Triton kernels, in one command on a CUDA machine (from anywhere):
#
#     bash bench/gpu_check.sh            # ~4 minutes (TOTAL_S=250); with bench/gpu_e2e.sh ~8 minutes
#
# 1. benchmarks every kernel against the torch reference, explicit per-sample gradients and (dense
#    aggregate) a cuBLAS GEMM on Llama-2-7B-shaped layers, bf16, most informative cases first,
#    within the time left for it (bench/bench_gpu_kernels.py: one table with the tuner's picked
#    config and a cross-check against the torch reference per row, then the target checks; each row
#    is also written to bench/out_gpu/kernels.jsonl as soon as it is measured);
# 2. then runs the GPU tests (pytest -m gpu tests/test_kernels.py: bf16 and large shapes, 2x-error
#    rule against float64) in the remaining time (TEST_S at least).
# Nothing stops at a check: a failed cross-check or test is reported beside the timings. Everything
# printed also goes to bench/out_gpu/gpu_check.log; the tuner's picks to bench/out_gpu/tune_log.jsonl.
#
# Installs nothing from the network. gefx is imported from this checkout through a throw-away
# package shim on PYTHONPATH (gefx/ plus kernels/ as gefx.kernels), so no build is needed; set
# GEFX_PIP_INSTALL=1 to run `pip install --no-deps --no-build-isolation -e .` instead.
# Environment: PYTHON (default python3), TOTAL_S (default 250), TEST_S (default 80).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-250}"
TEST_S="${TEST_S:-80}"
START=$(date +%s)
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
OUT="$ROOT/bench/out_gpu"
mkdir -p "$OUT"
: > "$OUT/tune_log.jsonl"
export GEFX_TRITON_TUNE_LOG="$OUT/tune_log.jsonl"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "${GEFX_PIP_INSTALL:-0}" = "1" ]; then
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >/dev/null || exit 1
else
    SHIM="$(mktemp -d)"
    trap 'rm -rf "$SHIM"' EXIT
    mkdir -p "$SHIM/gefx"
    for f in "$ROOT"/gefx/*; do ln -s "$f" "$SHIM/gefx/$(basename "$f")"; done
    ln -s "$ROOT/kernels" "$SHIM/gefx/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== environment"
"$PYTHON" - <<'PYEOF' || exit 1
import sys, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"not importable ({exc})"
import gefx, gefx.kernels as K
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {tv}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
print("gefx from", gefx.__file__, "| triton backend:", K.UNAVAILABLE or "available")
sys.exit(0 if torch.cuda.is_available() and not K.UNAVAILABLE else 3)
PYEOF

BUDGET=$(( TOTAL_S - TEST_S - ($(date +%s) - START) - 20 ))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
echo "== benchmark (budget ${BUDGET}s, hard limit $(( BUDGET + 40 ))s)"
timeout $(( BUDGET + 40 )) "$PYTHON" bench/bench_gpu_kernels.py --budget "$BUDGET" --out "$OUT/kernels.jsonl" "$@"
echo "benchmark exit code: $? (1: a cross-check failed, 124: cut at the hard limit; rows so far kept)"

LEFT=$(( TOTAL_S - ($(date +%s) - START) ))
if [ "$LEFT" -lt "$TEST_S" ]; then LEFT=$TEST_S; fi
echo "== GPU tests (limit ${LEFT}s)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout "$LEFT" "$PYTHON" -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider
    echo "pytest exit code: $?"
else
    echo "pytest not installed: GPU tests skipped"
fi
echo "total $(( $(date +%s) - START ))s; outputs: $OUT/gpu_check.log, kernels.jsonl, tune_log.jsonl"
