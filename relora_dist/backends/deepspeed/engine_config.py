"""The DeepSpeed JSON a run uses: the user's file parsed, checked against what relora_dist owns, and filled from
the run's batch shape, clipping and dtype (`--deepspeed CONFIG.json`).

The user's JSON supplies the engine options (ZeRO stage, offload, buckets); relora_dist fills in what it owns:
batch sizes, clipping, precision from `--dtype`, and the optimizer (built by the trainer, so every backend runs the
same AdamW). The loop owns the accumulation boundary (`managed_gradient_accumulation: false`).
"""

from __future__ import annotations

import json
from pathlib import Path

# Sections relora_dist owns: the run config sets them, a DeepSpeed JSON must not.
OWNED_KEYS = ("optimizer", "scheduler", "train_batch_size", "fp16")


def load_engine_config(path: str | Path | dict) -> dict:
    if isinstance(path, dict):
        return json.loads(json.dumps(path))
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read DeepSpeed config {path}: {e.strerror} (--deepspeed)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e} (--deepspeed)") from None


def _fill(config: dict, key: str, value, flag: str) -> None:
    """Set `key` to what the run config says; a JSON value of "auto" or the same value is fine."""
    current = config.get(key, "auto")
    if current != "auto" and current != value:
        raise ValueError(f"DeepSpeed config sets {key}={current!r} but the run uses {value!r} ({flag}); "
                         f"remove it from the JSON or set it to \"auto\"")
    config[key] = value


def engine_config(base: dict, *, dtype: str, micro_batch_size: int, accumulation_steps: int, world_size: int,
                  max_norm: float) -> dict:
    """The config handed to deepspeed.initialize: the user's JSON plus what the run config decides."""
    config = json.loads(json.dumps(base))
    for key in OWNED_KEYS:
        if key in config and not (key == "train_batch_size" and config[key] == "auto"):
            raise ValueError(f"DeepSpeed config must not set '{key}': relora_dist builds the optimizer, schedule and"
                             f" batch itself (see --lr, --global-batch-size, --dtype); fp16 is not supported")
    config.pop("train_batch_size", None)
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size, "--micro-batch-size")
    _fill(config, "gradient_accumulation_steps", accumulation_steps, "--global-batch-size / --micro-batch-size")
    _fill(config, "gradient_clipping", float(max_norm), "--grad-clip")
    bf16 = config.setdefault("bf16", {})
    enabled = bf16.get("enabled", "auto")
    if enabled != "auto" and bool(enabled) != (dtype == "bf16"):
        raise ValueError(f"DeepSpeed config has bf16.enabled={enabled} but --dtype is {dtype}; set it to \"auto\"")
    bf16["enabled"] = dtype == "bf16"
    config["managed_gradient_accumulation"] = False  # the training loop owns the boundary
    zero = config.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 1:
        zero.setdefault("overlap_comm", False)  # DeepSpeed allows overlap with a caller-owned boundary only at 2/3
    if zero.get("offload_param", {}).get("device", "none") == "nvme" or zero.get("offload_optimizer", {}).get("device", "none") == "nvme":
        raise ValueError("NVMe offload is not supported by relora_dist's reset (use \"device\": \"cpu\")")
    # The trainer's torch AdamW runs under ZeRO (also with CPU offload, where DeepSpeed would insist on its own).
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    if world_size * micro_batch_size * accumulation_steps <= 0:
        raise ValueError("batch sizes must be positive")
    return config
