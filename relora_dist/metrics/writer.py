"""Rank-0 metrics: OUT/metrics.jsonl (one object per update), the --report-to reporters (TensorBoard, W&B), a
progress bar, summary.json. The columns themselves come from relora_dist.metrics."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("relora_dist")


class MetricsWriter:
    """A progress bar on a terminal; in logs (no TTY) one line every ~5% of the run instead."""

    def __init__(self, out: Path, *, enabled: bool, total_steps: int, initial_step: int, progress: bool,
                 reporters: list = ()):
        self.enabled = enabled
        self._reporters = list(reporters) if enabled else []
        if enabled:
            _truncate_after(out / "metrics.jsonl", initial_step)
        self._file = open(out / "metrics.jsonl", "a") if enabled else None
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not (enabled and progress and interactive),
                         desc="train", dynamic_ncols=True, mininterval=1.0)
        self._log_every = max(1, total_steps // 20) if enabled and progress and not interactive else 0
        self._total = total_steps
        self._last = time.perf_counter()

    def update_time(self) -> float:
        """Seconds since the previous call (one optimizer update, merges and evals excluded by the caller)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def restart_clock(self) -> None:
        self._last = time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for reporter in self._reporters:
            reporter.log(record)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if self._log_every and (record["step"] % self._log_every == 0 or "val_loss" in record):
            val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            logger.info("update %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  tokens/s %.0f%s", record["step"], self._total,
                        record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"], val)

    def event(self, message: str, *, step: int | None = None) -> None:
        """A method event or a notice, in the log (and, with the update it follows, to the reporters)."""
        if not self.enabled:
            return
        if step is not None:
            for reporter in self._reporters:
                reporter.event(step, message)
        if self._bar.disable:
            logger.info(message)
        else:
            self._bar.write(message)

    def close(self) -> None:
        if self._file:
            self._file.close()
        for reporter in self._reporters:
            reporter.close()
        self._bar.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (updates a killed run logged after its last checkpoint): a resumed
    run re-logs them, so every update appears exactly once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line a killed writer left half-written."""
    try:
        return json.loads(line).get("step", 0) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
