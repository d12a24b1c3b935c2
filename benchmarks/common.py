"""What every benchmark shares: engines by label, the machine description, synchronised timing, result files."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from relora_dist import host_memory
from relora_dist.backends import build_backend
from relora_dist.backends.labels import ENGINE_LABELS, engine_label

ENGINES = tuple(ENGINE_LABELS)


def engine_backend(engine: str) -> str:
    """The relora-train --backend a harness engine name runs (zeroN: deepspeed)."""
    return engine_label(engine).backend


def cases(methods: list[str], engines: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(engine, method) pairs to measure, engine-major, and a note for each pair left out because the method does not
    support that engine (`Method.engines`)."""
    from relora_dist.methods import method_class

    kept, skipped = [], []
    for engine in engines:
        for method in methods:
            supported = method_class(method).engines
            if supported is None or engine_backend(engine) in supported:
                kept.append((engine, method))
            else:
                skipped.append(f"{method} on {engine}: not supported (the method runs on {', '.join(supported)})")
    return kept, skipped


def build_engine(engine: str, dtype: str, device, *, micro_batch_size: int = 1, accumulation_steps: int = 1,
                 max_norm: float = 1.0, **options):
    """The engine labelled `engine` (backends/labels.py; `zeroN` is DeepSpeed at ZeRO stage N with a minimal config:
    the run's own settings fill the rest). `options` are the engine's own (DDP's harness switches)."""
    label = engine_label(engine)
    if label.backend == "deepspeed":
        options = label.backend_options()
    return build_backend(label.backend, device=device, dtype=dtype, micro_batch_size=micro_batch_size,
                         accumulation_steps=accumulation_steps, max_norm=max_norm, **options)


def torchrun_command(nproc: int, *args) -> list[str]:
    """torchrun on this machine: `args` is the script (or -m module) and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]


def machine() -> dict:
    """Who measured: recorded with every result."""
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
        **({"host_memory": host_memory.applied} if host_memory.applied else {}),  # what this process set, if anything
    }


def keep_host_memory(device: torch.device) -> None:
    """On a CPU, the trainer's default allocator settings (relora_dist/host_memory.py), so a benchmark measures what a
    run does; recorded in machine()."""
    if device.type == "cpu":
        host_memory.keep_freed_memory()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`with watch("forward"): ...` accumulates synchronised seconds per phase."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def __call__(self, phase: str):
        return _Phase(self, phase)


class _Phase:
    def __init__(self, watch: Stopwatch, phase: str):
        self.watch, self.phase = watch, phase

    def __enter__(self):
        synchronize(self.watch.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        synchronize(self.watch.device)
        self.watch.seconds[self.phase] = self.watch.seconds.get(self.phase, 0.0) + time.perf_counter() - self.start


def write_results(rows: list[dict], json_path: str | Path, *, extra: dict | None = None, plot=None) -> None:
    """`json_path` gets {"machine", **extra, "rows"}; a CSV of the flat columns lands beside it, and
    `plot(rows, png_path)` draws the PNG beside it when given."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **(extra or {}), "rows": rows}, indent=1))
    columns = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))] if rows else []
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if plot is not None:
        plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
