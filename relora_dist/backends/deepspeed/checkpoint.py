"""DeepSpeed's checkpoint files read back: the model of a checkpoint for `relora-export` (DeepSpeed's own
zero_to_fp32 for ZeRO-1/2/3, the model file at stage 0), what the universal load leaves out (frozen parameters,
buffers) from the native files, and the conversion to DeepSpeed's universal layout for a resume at another
world size.

DeepSpeed unpickles its files with weights_only=False (its engine's load_checkpoint, zero_to_fp32, the universal
conversion and load): `check_checkpoint_data` reads every file of a checkpoint's engine folders as data first, allowing
exactly the classes DeepSpeed itself pickles into them (`engine_file_classes`), so a planted pickle is refused in one
line before DeepSpeed sees it. relora_dist's own reads of these files are weights_only too.

A checkpoint is `DIRECTORY/engine/` (`CHECKPOINT_TAG`), DeepSpeed's own layout: `mp_rank_00_model_states.pt` (stage
0-2) or `zero_pp_rank_<r>_mp_rank_00_model_states.pt` (ZeRO-3), and `*optim_states.pt` per rank from ZeRO-1 on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..base import load_checkpoint_file
from .fp32_copies import saved_shadows

CHECKPOINT_TAG = "engine"
MASTER_NAMES_KEY = "relora_master_names"  # stage-0 bf16: the params of each group of saved fp32 masters, in order
UNIVERSAL_DIR = "universal"


def engine_file_classes() -> list[type]:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoint files besides tensors and plain data (the 1037 files of
    18 checkpoints: stages 0-3, fp32 and bf16, BF16_Optimizer, CPU offload, ReLoRA, GaLore, Fira and SwitchLoRA,
    native and universal). Rebuilding them sets attributes and calls nothing else:
    - `LossScaler`: the static loss scaler (scale 1 in fp32 and bf16) every ZeRO wrapper saves as `loss_scaler`;
    - `ZeroStageEnum`: the stage a ZeRO optimizer file records (`zero_stage`), an int enum;
    - `fragment_address`: (numel, start) of each parameter's fragment of a flat partition (`param_slice_mappings`).
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_engine_file(path: Path) -> dict:
    """One of DeepSpeed's checkpoint files, as data (`engine_file_classes` allowed)."""
    return load_checkpoint_file(path, allowed=engine_file_classes())


def check_checkpoint_data(directory: Path) -> None:
    """Every file DeepSpeed may unpickle from this checkpoint (its native folder, and the universal one a resume at
    another world size made) loaded as data, before DeepSpeed reads any: a file that is not is refused by name
    (`CheckpointNotData`). The tensors' bytes are mapped, not read."""
    check_engine_files(Path(directory), (CHECKPOINT_TAG, UNIVERSAL_DIR))


def check_engine_files(directory: Path, tags: tuple[str, ...] | None = None) -> None:
    """The `*.pt` files under `directory`'s tag folders loaded as data; default tags: the one DeepSpeed's `latest`
    file names (a checkpoint another framework had DeepSpeed write, Trainer's `checkpoint-N/global_stepN`)."""
    if tags is None:
        latest = Path(directory) / "latest"
        tags = (latest.read_text().strip(),) if latest.is_file() else ()
    allowed = engine_file_classes()
    for tag in tags:
        for file in sorted((Path(directory) / tag).rglob("*.pt")):
            load_checkpoint_file(file, allowed=allowed, mmap=True)


def read_checkpoint_model(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model state in one process: ZeRO-1/2/3 shards are put back together by DeepSpeed's own
    zero_to_fp32 (frozen parameters from ZeRO-2 on, ZeRO-1's from the model file); a stage-0 checkpoint holds
    the whole module, and in bf16 its fp32 masters. A bf16 run's exact fp32 copies of frozen params replace their
    bf16 values."""
    check_checkpoint_data(directory)
    engine_dir = Path(directory) / CHECKPOINT_TAG
    if any(engine_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        # ZeRO-1 saves no frozen fragments (zero_to_fp32 returns no frozen params): they are whole in the model file
        state = saved_frozen_parameters(directory) | state
    else:
        saved = load_engine_file(engine_dir / "mp_rank_00_model_states.pt")
        state = saved["module"] | stage0_masters(saved)
    exact = saved_shadows(directory)
    return {k: exact[k].view(v.shape) if k in exact else v.float() for k, v in state.items()}


def saved_world_size(directory: Path) -> int | None:
    """Ranks that wrote a checkpoint's ZeRO partitions (None: stage 0 fp32 keeps one whole optimizer)."""
    files = list((Path(directory) / CHECKPOINT_TAG).glob("*optim_states.pt"))
    return len(files) or None


def saved_frozen_parameters(directory: Path) -> dict[str, torch.Tensor]:
    """Full values of the parameters outside the optimizer, from a native checkpoint: whole in the
    stage 0-2 model file, in per-rank flat fragments at ZeRO-3 (padded at the end)."""
    engine_dir = Path(directory) / CHECKPOINT_TAG
    files = sorted(engine_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda f: int(f.name.split("_")[3])) or [engine_dir / "mp_rank_00_model_states.pt"]
    states = [load_engine_file(f) for f in files]
    shapes = states[0].get("frozen_param_shapes") or {}
    # A single rank's stage 0-2 checkpoint lists no frozen fragments: its module state holds them whole.
    whole = {name: t for name, t in (states[0].get("module") or {}).items() if t.numel()} if len(states) == 1 else {}
    return whole | {name: torch.cat([s["frozen_param_fragments"][name].reshape(-1) for s in states])[: shape.numel()].view(shape)
                    for name, shape in shapes.items()}


def stage0_masters(saved: dict) -> dict[str, torch.Tensor]:
    """The fp32 masters of a stage-0 bf16 checkpoint by name (its module holds the bf16 params): DeepSpeed saves them
    per group, as one tensor per param (FP16_UnfusedOptimizer) or one flat tensor (FP16_Optimizer), in the order of
    the names `save` records."""
    optimizer = saved.get("optimizer") or {}
    groups = optimizer.get("fp32_groups", optimizer.get("fp32_groups_flat"))
    names = saved.get(MASTER_NAMES_KEY)
    if groups is None or names is None:
        return {}
    out = {}
    for group_names, group in zip(names, groups):
        shapes = [saved["module"][name].shape for name in group_names]
        tensors = group if isinstance(group, (list, tuple)) else group.split([s.numel() for s in shapes] + [group.numel() - sum(s.numel() for s in shapes)])
        out.update({name: t.reshape(shape).float() for name, t, shape in zip(group_names, tensors, shapes)})
    return out


def saved_buffers(directory: Path) -> dict[str, torch.Tensor]:
    """The module's persistent buffers from a native checkpoint's model file (whole on every rank)."""
    engine_dir = Path(directory) / CHECKPOINT_TAG
    file = next(iter(sorted(engine_dir.glob("*model_states.pt"))))
    state = load_engine_file(file)
    return {name: state["module"][name] for name in state.get("buffer_names") or () if name in state["module"]}


def universal_checkpoint(directory: Path, *, convert: bool) -> Path:
    """DIRECTORY/universal, DeepSpeed's world-size-independent layout of the checkpoint, made by its own
    ds_to_universal on first use (into a temporary folder, renamed when complete)."""
    target = Path(directory) / UNIVERSAL_DIR
    if convert and not (target / CHECKPOINT_TAG).is_dir():
        tmp = Path(directory) / f"{UNIVERSAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(Path(directory) / CHECKPOINT_TAG), "--output_folder", str(tmp / CHECKPOINT_TAG),
                   "--inject_missing_state"]  # our client state has no Megatron metadata; none is needed
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise ValueError(f"checkpoint {directory}: DeepSpeed's universal conversion failed: "
                             f"{lines[-1] if lines else result.returncode}")
        os.replace(tmp, target)
    return target
