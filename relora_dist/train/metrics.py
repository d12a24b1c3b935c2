"""Rank-0 metrics: OUT/metrics.jsonl (one object per update), a progress bar, summary.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("relora_dist")


class MetricsWriter:
    def __init__(self, out: Path, *, enabled: bool, total_steps: int, initial_step: int, progress: bool):
        self.enabled = enabled
        self._file = open(out / "metrics.jsonl", "a") if enabled else None
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not (enabled and progress),
                         desc="train", dynamic_ncols=True, mininterval=1.0)
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
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def event(self, message: str) -> None:
        if self.enabled:
            self._bar.write(message) if not self._bar.disable else logger.info(message)

    def close(self) -> None:
        if self._file:
            self._file.close()
        self._bar.close()


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
