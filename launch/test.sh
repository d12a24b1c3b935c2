#!/usr/bin/env bash
# Set up a virtualenv (if needed) and run the CPU test suite. Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
# torch first: a plain 'torch' requirement on a machine without it pulls a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[dev]"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
