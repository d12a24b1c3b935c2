#!/usr/bin/env bash
# Set up .venv (if needed) and run the CPU test suite. Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
RELORA_EXTRAS="[dev]" source launch/setup_env.sh
# --durations: the slowest tests in every log (CI keeps the whole run under 30 min)
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
