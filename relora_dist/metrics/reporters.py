"""Where each update's record goes besides metrics.jsonl (`--report-to`, the name HF Trainer uses): TensorBoard
event files under the run directory, a W&B run. Rank 0 only. A resumed run logs each step once: TensorBoard purges
what a killed run wrote past the checkpoint (`purge_step`), W&B continues the same run id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

from .columns import scalar_tags

REPORTERS = ("tensorboard", "wandb")  # each one's package has its name


def reporter_names(report_to: str) -> tuple[str, ...]:
    """--report-to's value as names: 'none' (or empty) is none, else a comma-separated list."""
    names = tuple(n.strip() for n in report_to.split(",") if n.strip())
    return () if names in ((), ("none",)) else names


def check_report_to(names: tuple[str, ...]) -> None:
    """One-line errors for an unknown reporter or one whose package is missing (before any rank starts work)."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"unknown reporter {name!r}; choose from {', '.join(REPORTERS)} or none (--report-to)")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name} needs the {name} package (pip install {name})")


class TensorBoardReporter:
    """Scalars per update under OUT/tensorboard, method events as text."""

    def __init__(self, out: Path, *, initial_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # Steps after `initial_step` may be in the files already (a run killed after its last checkpoint): TensorBoard
        # drops them when it reads the restart marker purge_step writes, so every step is shown once.
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=initial_step + 1 if initial_step else None)
        if not initial_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, record: dict) -> None:
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def event(self, step: int, message: str) -> None:
        self.writer.add_text("events", message, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per run directory (its id kept in OUT/wandb_id, so a resume continues it). WANDB_MODE=offline
    writes it locally with no network; WANDB_PROJECT names the project (default relora_dist)."""

    def __init__(self, out: Path, *, initial_step: int, config: dict):
        import wandb

        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if initial_step and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "relora_dist"), id=run_id, resume="allow",
                              dir=str(out), name=out.name, config=config)

    def log(self, record: dict) -> None:
        self.run.log(scalar_tags(record), step=record["step"])

    def event(self, step: int, message: str) -> None:
        self.run.log({"events": message}, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


def build_reporters(names: tuple[str, ...], out: Path, *, initial_step: int, config: dict) -> list:
    return [_CLASSES[name](out, initial_step=initial_step, config=config) for name in names]
