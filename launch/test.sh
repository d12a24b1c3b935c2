#!/usr/bin/env bash
# Set up .venv (if needed) and run the CPU test suite. Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
RELORA_EXTRAS="[dev]" source launch/setup_env.sh
# --durations: the slowest tests in every log (CI keeps the whole run under 30 min).
# Two pytest-xdist workers, one test file each at a time (--dist loadfile: a file's shared launches and session
# fixtures stay on one worker): a serial run leaves a third of 2 cores idle (launch start-up, gloo waits), and this
# one took 20 min where serial ones took 26-31. RELORA_TEST_WORKERS=0 runs serially in this process.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 -n "${RELORA_TEST_WORKERS:-2}" --dist loadfile tests "$@"
