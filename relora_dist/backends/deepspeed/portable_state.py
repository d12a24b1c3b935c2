"""Optimizer state DeepSpeed's universal checkpoint cannot reshard, carried beside it.

DeepSpeed resumes at another world size by converting every rank's flat optimizer partition into per-parameter files
(`ds_to_universal`), slicing `exp_avg` and `exp_avg_sq` by each parameter's fragment of the flat tensor; other state
keys are dropped. An optimizer whose moments are not element-wise (GaLore's (m x r) moments per matrix,
`methods/galore/flat_partition.py`) has nothing there to slice, and one with other element-wise state (SwitchLoRA's step
counters, `methods/switchlora/optimizer.py`) would lose it; such an optimizer is an `access.FlatPartitionOptimizer`
whose `state_reshardable` is False. So, in the engine's own files, such moments are kept under `unsliced_<key>` with a
zero-stride placeholder of the flat size where DeepSpeed looks (no bytes on disk; a same-size resume swaps them back),
and the optimizer's world-size-free records (`portable_state`, keyed here by parameter name) go into one file per rank. After a universal
load the optimizer rebuilds its state from the files of all saved ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..base import load_checkpoint_file

PORTABLE_FILE = "optimizer_rows_rank{}.pt"
SLICED_KEYS = ("exp_avg", "exp_avg_sq")  # what ds_to_universal slices by fragment


def keep_state_convertible(optimizer: torch.optim.Optimizer) -> None:
    """State-dict hooks: moments that are not element-wise move aside, with placeholders DeepSpeed can slice."""

    def after_state_dict(opt, state_dict):
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, entry in list(state_dict["state"].items()):
            numel = params[index].numel()
            moved = [k for k in SLICED_KEYS if torch.is_tensor(entry.get(k)) and entry[k].numel() != numel]
            if moved:
                entry = state_dict["state"][index] = dict(entry)  # the live state's dict is packed as is: copy it
                for key in moved:
                    entry[f"unsliced_{key}"] = entry[key]
                    entry[key] = entry[key].new_zeros(1).expand(numel)
        return state_dict

    def before_load(opt, state_dict):
        for entry in state_dict["state"].values():
            for key in SLICED_KEYS:
                if f"unsliced_{key}" in entry:
                    entry[key] = entry.pop(f"unsliced_{key}")
        return state_dict

    optimizer.register_state_dict_post_hook(after_state_dict)
    optimizer.register_load_state_dict_pre_hook(before_load)


@contextlib.contextmanager
def groups_filled(wrapper):
    """ZeRO-3 hands its optimizer the flat tensors only around a step or a state dict: here too."""
    fill = getattr(wrapper, "_set_fp32_optimizer_param_groups", None)
    if fill is not None:
        fill()
    try:
        yield
    finally:
        if fill is not None:
            wrapper._clear_fp32_optimizer_param_groups()


def save_portable_state(directory: Path, wrapper, module: torch.nn.Module, rank: int) -> None:
    """This rank's records of the optimizer's world-size-free state, by parameter name (none: no file)."""
    with groups_filled(wrapper):
        records = wrapper.optimizer.portable_state()
    if records:
        names = {id(p): n for n, p in module.named_parameters()}
        torch.save({names[id(p)]: record for p, record in records.items()}, Path(directory) / PORTABLE_FILE.format(rank))


def has_portable_state(directory: Path) -> bool:
    return any(Path(directory).glob(PORTABLE_FILE.format("*")))


def load_portable_state(directory: Path, wrapper, module: torch.nn.Module, partitions: dict) -> None:
    """Rebuild the optimizer's partitioned state from every saved rank's records; DeepSpeed's own fragment views of
    the placeholders it loaded for those tensors are dropped (they would keep flat-sized buffers alive)."""
    params = dict(module.named_parameters())
    files = sorted(Path(directory).glob(PORTABLE_FILE.format("*")))
    records = []
    for file in files:
        saved = load_checkpoint_file(file)
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise ValueError(f"checkpoint {directory}: optimizer state for parameters this model lacks ({unknown[0]}, ...)")
        records.append({params[name]: record for name, record in saved.items()})
    with groups_filled(wrapper):
        replaced = wrapper.optimizer.load_portable_state(records)
    for flat in replaced:
        for part in partitions[id(flat)]:
            mapping = getattr(part.param, "_hp_mapping", None)
            if mapping is not None and mapping.optim_fragment:
                mapping.optim_fragment.clear()
