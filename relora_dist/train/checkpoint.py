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

from ..backends.base import Backend, load_checkpoint_file

STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "method_state.pt"


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
    root: Path, step: int, backend: Backend, trainer_state: dict, write_extra: Callable[[Path], None], keep: int,
    written: Callable[[], None] = lambda: None,
) -> Path:
    """Every rank calls this. `write_extra(dir)` runs on rank 0 (model config, tokenizer, run config);
    `written()` on every rank once its files are down, before the commit (fault injection)."""
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
    written()
    backend.barrier()
    if backend.rank == 0:
        # A checkpoint of the same update (a resumed run saving again) is moved aside, not deleted first:
        # a kill at any point leaves a complete checkpoint that `latest` or the fallback scan finds.
        aside = root / f"step_{step:07d}.old"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:  # left by killed writers
            shutil.rmtree(stale, ignore_errors=True)
        for old in sorted(root.glob("step_???????"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints in `root`, oldest first (half-written `.tmp` folders are not among them)."""
    return sorted(p for p in root.glob("step_???????") if (p / STATE_FILE).is_file())


def claim_run_directory(out: Path, *, overwrite: bool, is_main: bool) -> None:
    """A fresh run never mixes its metrics and checkpoints with an earlier run's in the same OUT. Rank 0 decides
    (`distributed.rank0_first` hands its error to every rank): another rank looking later could see what rank 0 has
    written since."""
    if not is_main:
        return
    previous = [p for p in (out / "checkpoints", out / "metrics.jsonl", out / "summary.json") if p.exists()]
    if not previous:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start"
                         " afresh, or another --out")
    for path in previous:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def resolve_checkpoint(resume: str, out: Path) -> Path | None:
    """'latest' -> the checkpoint named by OUT/checkpoints/latest; 'auto' -> the same, or None when OUT has
    no committed checkpoint; otherwise a checkpoint directory."""
    if resume == "auto":
        root = out / "checkpoints"
        return resolve_checkpoint("latest", out) if complete_checkpoints(root) or (root / "latest").is_file() else None
    if resume == "latest":
        root = out / "checkpoints"
        path = latest_checkpoint(root)
        if path is None:
            raise ValueError(f"--resume: no checkpoint found in {root}")
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint a checkpoints folder's `latest` pointer names, else (pointer missing, or naming nothing
    complete) the newest committed one; None when `root` has none."""
    pointer = root / "latest"
    path = root / pointer.read_text().strip() if pointer.is_file() else None
    if path is not None and not (path / STATE_FILE).is_file():
        path = path.with_name(path.name + ".old")  # killed while a same-update checkpoint replaced it
    if path is None or not (path / STATE_FILE).is_file():
        # Killed between a commit and the pointer update: the newest committed checkpoint is the one.
        found = complete_checkpoints(root)
        path = found[-1] if found else None
    return path


class NotACheckpointError(ValueError):
    """`find_checkpoint` was given something that exists but is no checkpoint, checkpoints folder or run."""


def find_checkpoint(given: str | Path) -> Path:
    """The checkpoint meant by a path a user gives (relora-export): a checkpoint directory (OUT/checkpoints/step_N),
    the `latest` pointer file (OUT/checkpoints/latest), a checkpoints folder (OUT/checkpoints) or a run directory
    (OUT); the last three resolve like `--resume latest`. One-line ValueError naming `given` otherwise."""
    path = Path(given)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {given}")
    if (path / STATE_FILE).is_file():
        return path
    if path.is_file() and path.name == "latest":
        root = path.parent
    elif path.is_dir() and ((path / "latest").is_file() or any(path.glob("step_*"))):
        root = path
    elif path.is_dir() and (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif path.is_dir() and path.name.startswith("step_"):
        raise ValueError(f"{given} is not a complete checkpoint (no {STATE_FILE})")
    else:
        raise NotACheckpointError(f"{given} is neither a checkpoint, a run directory nor a checkpoints folder")
    found = latest_checkpoint(root)
    if found is None:
        raise ValueError(f"no complete checkpoint found in {given}" if root == path
                         else f"{given}: no complete checkpoint found in {root}")
    return found


# Model config keys that fix parameter shapes, and the flags that set them.
SHAPE_KEYS = {"vocab_size": "--tokenizer, --vocab-size", "hidden_size": "--model, --model-config",
              "intermediate_size": "--model, --model-config", "num_hidden_layers": "--model, --model-config",
              "num_attention_heads": "--model, --model-config", "num_key_value_heads": "--model, --model-config"}


def check_model_fits(path: Path, model_config: dict) -> None:
    """A checkpoint of another model shape (or tokenizer) is named as such, before any engine load fails on it."""
    saved_file = path / "model_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    for key, flags in SHAPE_KEYS.items():
        if key in saved and saved[key] != model_config.get(key):
            raise ValueError(f"--resume: {path} holds a model with {key} {saved[key]}, this run builds"
                             f" {model_config.get(key)} ({flags})")


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is corrupt: {STATE_FILE}: {e}") from None


def save_method_state(directory: Path, state: dict) -> None:
    """The method's own state (tensors and primitives, the same on every rank), written by rank 0."""
    if state:
        torch.save(state, directory / METHOD_STATE_FILE)


def load_method_state(directory: Path) -> dict:
    file = directory / METHOD_STATE_FILE
    return load_checkpoint_file(file) if file.is_file() else {}


def load_rng(path: Path, rank: int) -> bool:
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        return False
    set_rng_state(load_checkpoint_file(file))  # weights_only=True: the states are ByteTensors
    return True
