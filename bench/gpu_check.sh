#!/usr/bin/env bash
# GPU check of the Triton kernels, in one command on a CUDA machine (from anywhere):
#
#     bash bench/gpu_check.sh            # ~6 minutes at most
#
# 1. runs the GPU tests (pytest -m gpu tests/test_kernels.py: bf16 and large shapes, 2x-error rule
#    against float64) with a hard time limit;
# 2. benchmarks every kernel against the torch reference, explicit per-sample gradients and (dense
#    aggregate) a cuBLAS GEMM on Llama-2-7B-shaped layers, bf16, within the remaining time budget
#    (bench/bench_gpu_kernels.py prints the table and the target checks).
#
# Installs nothing from the network. gefx is imported from this checkout through a throw-away
# package shim on PYTHONPATH (gefx/ plus kernels/ as gefx.kernels), so no build is needed; set
# GEFX_PIP_INSTALL=1 to run `pip install --no-deps --no-build-isolation -e .` instead.
# Environment: PYTHON (default python3), TOTAL_S (default 340), TEST_S (default 150).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-340}"
TEST_S="${TEST_S:-150}"
START=$(date +%s)
unset TRITON_INTERPRET

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

echo "== GPU tests (limit ${TEST_S}s)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout "$TEST_S" "$PYTHON" -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider
    echo "pytest exit code: $?"
else
    echo "pytest not installed: GPU tests skipped"
fi

LEFT=$(( TOTAL_S - ($(date +%s) - START) ))
BUDGET=$(( LEFT - 45 ))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
echo "== benchmark (budget ${BUDGET}s, hard limit $(( BUDGET + 40 ))s)"
timeout $(( BUDGET + 40 )) "$PYTHON" bench/bench_gpu_kernels.py --budget "$BUDGET" "$@"
echo "benchmark exit code: $?; total $(( $(date +%s) - START ))s"
