#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job: a tiny LLaMA pre-trained with ReLoRA (full-rank warm
# start, then merges/resets) on the embedded corpus, on all GPUs, or 2 CPU ranks when there is none.
# Extra arguments are passed to relora-train (e.g. --steps 100 --out runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
else
  NPROC=2
fi
# The default global batch is 16 sequences; keep it divisible by the world size.
if [ $((16 % NPROC)) -eq 0 ]; then BATCH=(--global-batch-size 16 --micro-batch-size $((16 / NPROC < 4 ? 16 / NPROC : 4)));
else BATCH=(--global-batch-size $((4 * NPROC)) --micro-batch-size 4); fi
exec "$VENV/bin/torchrun" --standalone --nproc_per_node "$NPROC" launch/train.py \
  --config launch/configs/default.yaml "${BATCH[@]}" "$@"
