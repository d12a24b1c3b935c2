# Sourced by quickstart.sh and test.sh: create $VENV (default .venv) and install relora_dist into it.
# torch goes first: a plain 'torch' requirement on a machine without it pulls a multi-GB CUDA build;
# torch==2.13.0 takes the local CPU wheel where one is provided, the PyPI build elsewhere.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".${RELORA_EXTRAS:-}"
# --compile on a CPU: Inductor builds its kernels with a C++ compiler (not pip-installable; e.g. apt install g++).
if ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null && ! command -v c++ >/dev/null; then
  echo "setup: no C++ compiler on PATH: everything works except --compile (Inductor) on a CPU; install g++ for it" >&2
fi
