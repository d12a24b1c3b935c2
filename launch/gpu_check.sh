#!/usr/bin/env bash
# On one GPU, in at most 8 minutes: compiled kernel tests, kernel timings against their targets, and 30-update
# runs per engine (eager / --compile, fused kernels on / off). Report: gpu_check_out/{gpu_check.json,summary.txt}.
# Usage: bash launch/gpu_check.sh [--out DIR] [--budget-s S] [--strict-targets]. Without a GPU it refuses (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
