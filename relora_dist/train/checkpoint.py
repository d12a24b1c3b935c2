"""Atomic, resumable checkpoints: OUT/checkpoints/step_NNNNNNN/ plus a `latest` pointer.

A checkpoint is written into `step_N.tmp/` and renamed only when every rank has finished, so a kill
mid-write leaves the previous checkpoint as `latest` and the partial one ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..backends.base import Backend

STATE_FILE = "trainer_state.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: Path, step: int, backend: Backend, trainer_state: dict, write_extra: Callable[[Path], None], keep: int
) -> Path:
    """Every rank calls this. `write_extra(dir)` runs on rank 0 (model config, tokenizer, run config)."""
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if backend.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save(tmp, trainer_state)
    torch.save(rng_state(), tmp / f"rng_rank{backend.rank}.pt")
    if backend.rank == 0:
        write_extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    backend.barrier()
    if backend.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for old in sorted(root.glob("step_???????"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def claim_run_directory(out: Path, *, overwrite: bool, is_main: bool) -> None:
    """A fresh run never mixes its metrics and checkpoints with an earlier run's in the same OUT."""
    previous = [p for p in (out / "checkpoints", out / "metrics.jsonl", out / "summary.json") if p.exists()]
    if not previous:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite true to start"
                         " afresh, or another --out")
    if is_main:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def resolve_checkpoint(resume: str, out: Path) -> Path:
    """'latest' -> the checkpoint named by OUT/checkpoints/latest; otherwise a checkpoint directory."""
    if resume == "latest":
        pointer = out / "checkpoints" / "latest"
        if not pointer.is_file():
            raise ValueError(f"--resume: no checkpoint found in {out / 'checkpoints'}")
        path = out / "checkpoints" / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is corrupt: {STATE_FILE}: {e}") from None


def load_rng(path: Path, rank: int) -> bool:
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        return False
    set_rng_state(torch.load(file, weights_only=False))
    return True
