"""The one interface every distributed engine implements: the training ops the loop calls (setup,
forward context, backward, step, checkpoint), so the loop never branches on which engine it runs, and a
`relora_dist.access.TensorAccess` saying where this rank's pieces of parameters and optimizer states live.

Engines know nothing of training methods: methods act on the model only through that access layer.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..access import TensorAccess


@dataclass
class NoOptions:
    """An engine without options of its own."""


def error_reason(error: BaseException) -> str:
    """The informative line of an engine's or torch's error: the first size mismatch of a state-dict load,
    else the first sentence of the first line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        return lines[1].rstrip(".")
    return lines[0].split(". ")[0].rstrip(".")


class CheckpointNotData(ValueError):
    """A checkpoint file that holds more than tensors and plain data: unpickling it would import and call what it
    names, so a checkpoint copied from someone else could run code at --resume or in relora-export."""

    def __init__(self, path, detail: str):
        super().__init__(f"checkpoint file {path} is not plain data ({detail}): refusing to unpickle it")


def _weights_only_refusal(error: Exception) -> str | None:
    """What torch's weights-only unpickler refused (`it names posix.system`), None for other load errors."""
    message = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in message:
        return None
    name = re.search(r"GLOBAL (\S+)", message)
    if name:
        return f"it names {name.group(1)}"
    reason = message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip().splitlines()
    return reason[-1].strip().rstrip(".") if reason else "refused by torch's weights-only unpickler"


def load_checkpoint_file(path: Path | io.BytesIO, map_location="cpu", *, allowed: Sequence[type] = (), mmap: bool = False,
                         name: str | Path | None = None):
    """torch.load of one checkpoint file as data (weights_only=True), with the classes `allowed` besides tensors and
    plain data (an engine's own: DeepSpeed's loss scaler). A file naming anything else is refused
    (`CheckpointNotData`); a truncated or garbled one is a one-line ValueError naming the file (`name`, default
    `path`). `mmap`: the tensors' bytes are mapped, not read (checking a file's pickle costs little), where the file
    is a zip archive on disk (torch.save's format)."""
    name = path if name is None else name
    try:
        with torch.serialization.safe_globals(list(allowed)):
            mmap = mmap and isinstance(path, (str, Path)) and zipfile.is_zipfile(path)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {name} is missing") from None
    except Exception as e:  # zip, pickle and OS errors, depending on where the file was cut
        refusal = _weights_only_refusal(e)
        if refusal is not None:
            raise CheckpointNotData(name, refusal) from None
        raise ValueError(f"checkpoint file {name} is truncated or corrupt ({error_reason(e)})") from None


@contextlib.contextmanager
def checkpoint_must_fit(directory, run: str = "this run"):
    """One ValueError line for the many exception types engines raise on a checkpoint that does not fit (a file
    refused as not data keeps its own line)."""
    try:
        yield
    except CheckpointNotData:
        raise
    except (RuntimeError, ValueError, KeyError, IndexError, OSError, EOFError, AssertionError) as e:
        raise ValueError(f"checkpoint {directory} does not fit {run}: {error_reason(e)}") from None


class Backend(ABC):
    """Training ops of one engine (single process/DDP, DeepSpeed, FSDP2, fairscale, ZeroRedundancyOptimizer).

    Constructed with the device, the dtype, the run's batch shape (engines that schedule their own
    accumulation or clipping need it) and the engine's own options, the fields of `Options` (also its
    `options_section` of the run config); anything else is refused.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    # Config section holding `Options` (engines that share options share a section); None: no options.
    options_section: ClassVar[str | None] = None
    # An option field whose value selects this engine when --backend was left at its default (--deepspeed).
    implied_by: ClassVar[str | None] = None
    # The engine steps a plain torch optimizer keyed by the module's own parameters, so optimizer states can be
    # carried over when a method rebuilds the model (--keep-states-at-switch).
    carries_states: ClassVar[bool] = False
    # For the throughput harness: no_sync() really defers the gradient reduction (DeepSpeed reduces inside
    # its own backward/step).
    defers_gradient_sync: ClassVar[bool] = True
    # `adopt` takes a bare module (a single process): asked after the engines that recognise their own wrappers.
    adopts_bare_modules: ClassVar[bool] = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def __init__(self, *, device: torch.device, dtype: str = "fp32", micro_batch_size: int = 1, accumulation_steps: int = 1,
                 max_norm: float = 1.0):
        self.device = device
        self.dtype = dtype
        self.micro_batch_size, self.accumulation_steps, self.max_norm = micro_batch_size, accumulation_steps, max_norm
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    @classmethod
    def check_options(cls, options, *, dtype: str, micro_batch_size: int, accumulation_steps: int, world_size: int,
                      max_norm: float) -> None:
        """Reject what this engine would reject at setup, before any rank starts work (one-line ValueError)."""

    @classmethod
    def optimizer_layout(cls, options, *, dtype: str) -> str:
        """What the tensors this engine's optimizer steps are (`access.OPTIMIZER_LAYOUTS`): whole parameters here."""
        return "whole"

    # -- lifecycle ------------------------------------------------------------------------------------
    @classmethod
    def adopt(cls, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, dtype: str = "fp32",
              fp32_values: Mapping[str, torch.Tensor] | None = None) -> "Backend | None":
        """This engine around a model and optimizer another framework built and wrapped (Hugging Face Trainer through
        accelerate), for the access layer, replica checks and the export; None when `wrapped` is not this engine's.
        `fp32_values`: the exact values of the frozen parameters a method declares `keep_fp32`, taken before the
        engine cast the model (an engine holding them in bf16 keeps fp32 copies from these). The framework keeps
        the training ops (forward, backward, step, checkpoints); the adopted engine adds what it does after
        setting up its own (ZeRO-3's dormant partitions, a flat-partition optimizer's layout)."""
        return None

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], param_groups: list[dict]) -> None:
        """Wrap `model` and build its optimizer from param groups. Called again when a method rebuilds the model."""

    def close(self) -> None:
        """Release what the engine holds (DeepSpeed's engine, its buffers); the backend is unusable afterwards."""

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The module to call for forward passes (possibly wrapped)."""

    @property
    @abstractmethod
    def unwrapped_model(self) -> nn.Module:
        """The user's model, without engine wrappers."""

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer: ...

    # -- one update -------------------------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches off the accumulation boundary (no gradient communication)."""

    def compute_only(self) -> contextlib.AbstractContextManager:
        """No gradient reduction at all, whatever the loop's sync policy: the harness's compute baseline."""
        return self.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self, max_norm: float) -> float:
        """The global gradient norm (the same on every rank), the gradients clipped to `max_norm` in place when it
        is > 0 (a non-finite norm skips the step, and the gradients are zeroed next)."""
        raise NotImplementedError

    def step(self, *, lr: float | Mapping[str, float], max_norm: float, loss_is_finite: bool = True) -> tuple[float, bool]:
        """End of an accumulation window: clip the gradients to `max_norm` (0: no clipping) and take the
        optimizer step at `lr` (one rate, or one per param group name), unless the loss or the global gradient norm is non-finite (the same decision
        on every rank). Returns (global gradient norm, whether the step was taken). Engines that clip and
        check inside their own step (DeepSpeed) override this."""
        grad_norm = self.clip_gradients(max_norm)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            self.set_lr(lr)
            self.optimizer.step()
        return grad_norm, stepped

    @abstractmethod
    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float | Mapping[str, float]) -> None:
        set_group_lrs(self.optimizer.param_groups, lr)

    @abstractmethod
    def shard_access(self) -> TensorAccess: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over all ranks in place (loss logging, evaluation)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    # -- checkpoints ------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path, trainer_state: dict) -> None:
        """Write model and optimizer state into `directory` (every rank calls it). Engines with their own
        checkpoint format store `trainer_state` (update counter, data position) inside it as well."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (every rank calls it, after `setup`)."""

    def save_adopted(self, directory: Path) -> None:
        """An adopted engine (`adopt`): what it keeps beyond the framework's own checkpoint files, into `directory`
        (every rank calls it). Default: nothing."""

    def load_adopted(self, directory: Path) -> None:
        """An adopted engine: restore what `save_adopted` wrote, after the framework loaded its own files."""

    @classmethod
    def check_adopted_checkpoint(cls, directory: Path) -> None:
        """Before a framework resumes an adopted engine from its checkpoint `directory`: the files the engine itself
        unpickles without weights_only, read as data first (a planted one refused by name). Default: none."""

    @classmethod
    def checkpoint_model_source(cls, directory: Path) -> Path:
        """The file or folder holding the model state in a checkpoint this engine wrote (for error messages)."""
        return Path(directory) / "model.pt"

    @classmethod
    def read_checkpoint_model(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The full model state dict of a checkpoint this engine wrote, in one process without a process group
        (relora-export). Default: the whole-module file rank 0 wrote."""
        return load_checkpoint_file(cls.checkpoint_model_source(directory))

    # -- the model between phases -------------------------------------------------------------------------
    def release_model(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        """End this engine's hold on the model and return it as a plain module with full parameters, ready to
        be rebuilt and wrapped again. Engines that partition or hook the module return a fresh `build_model()`
        loaded with the full values (fp32 masters where they exist)."""
        return self.unwrapped_model

    @staticmethod
    def rebuilt_model(build_model: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh `build_model()` holding the full parameter values `state` (for `release_model`)."""
        with torch.random.fork_rng(devices=[]):  # building must not move the training RNG
            model = build_model()
        missing, unexpected = model.load_state_dict(state, strict=False)
        params = dict(model.named_parameters())  # tied weights appear once; buffers are rebuilt by build_model
        lost = [k for k in missing if k in params] + list(unexpected)
        if lost:
            raise RuntimeError(f"released state and the rebuilt model disagree on {lost[:4]}")
        return model

    def ensure_process_group(self) -> None:
        """Engines that need a process group even in one plain process get a private 1-rank group."""
        if not torch.distributed.is_initialized():
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(name, value)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1)

    def model_state_for_export(self) -> dict[str, torch.Tensor]:
        """Full model state dict on rank 0 (consolidating shards where needed); {} elsewhere."""
        return {k: v.detach().cpu() for k, v in self.unwrapped_model.state_dict().items()} if self.rank == 0 else {}

    def param_states(self, params) -> dict:
        """Optimizer state per parameter object, for carrying states over a rebuild (engines with
        `carries_states` implement it)."""
        raise ValueError(f"--keep-states-at-switch is not supported with --backend {self.name}")

    def restore_param_states(self, states: dict) -> None:
        if states:
            raise ValueError(f"--keep-states-at-switch is not supported with --backend {self.name}")

    def engine_held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors the engine holds beside the module and the optimizer, by memory category (relora-memprof)."""
        return {}

    def replicated_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors that must be bit-identical on every rank (all of them for replicated engines)."""
        model = self.unwrapped_model
        out = list(model.state_dict().items())
        for name, param in model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    out.append((f"{name}/{key}", value))
        return out


def clip_replicated_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Global norm of gradients every rank holds whole (DDP has already averaged them), clipped in place. Clips
    with max_norm = inf when clipping is off: a multiplication by exactly 1."""
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


def set_group_lrs(param_groups: list[dict], lr: float | Mapping[str, float]) -> None:
    """Set every group's rate: one for all, or each group's by its `name` (a group the mapping misses is an error,
    not a silent old rate), times the group's `lr_scale` where it has one (--non-projection-lr-scale)."""
    for group in param_groups:
        group["lr"] = scaled_rate(group, lr[group["name"]] if isinstance(lr, Mapping) else lr)


def scaled_rate(group: dict, rate: float) -> float:
    """A param group's rate for the schedule's `rate`: times its `lr_scale` where it has one."""
    return rate * group["lr_scale"] if "lr_scale" in group else rate
