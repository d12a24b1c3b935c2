"""The one interface every distributed engine implements.

Two halves:
- training ops the loop calls (setup, forward context, backward, step, checkpoint), so the loop never
  branches on which engine it runs;
- `ShardAccess`: where the pieces of W, A, B and their Adam states live on this rank. Merge, re-init
  and prune are written once (`relora_dist.merge`, `relora_dist.prune`) on top of it.

A piece is a flat range of the *full* flattened tensor: replicated engines hand out one piece that
starts at 0; ZeRO-1/2 fragments, ZeRO-3 `ds_tensor` slices and FSDP2 row shards are flat ranges too.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass
class Piece:
    """Elements [start, start + numel) of a full flattened tensor held by this rank.

    `views` are all writable holders of those elements (low-precision param, fp32 master, ...):
    every write must reach all of them, in place.
    """

    start: int
    views: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        # Holders can alias (ZeRO-3 at world size 1 gathers W into its own ds_tensor): a merge adds to
        # each view, so each memory range must appear once.
        seen, distinct = set(), []
        for view in self.views:
            key = (view.data_ptr(), view.numel(), view.dtype, view.device)
            if key not in seen:
                seen.add(key)
                distinct.append(view)
        self.views = distinct

    @property
    def numel(self) -> int:
        return self.views[0].numel() if self.views else 0


def error_reason(error: BaseException) -> str:
    """The informative line of an engine's or torch's error: the first size mismatch of a state-dict load,
    else the first sentence of the first line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        return lines[1].rstrip(".")
    return lines[0].split(". ")[0].rstrip(".")


def load_checkpoint_file(path: Path, map_location="cpu"):
    """torch.load of one checkpoint file; a truncated or garbled file is a one-line ValueError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # zip, pickle and OS errors, depending on where the file was cut
        raise ValueError(f"checkpoint file {path} is truncated or corrupt ({error_reason(e)})") from None


@contextlib.contextmanager
def checkpoint_must_fit(directory, run: str = "this run"):
    """One ValueError line for the many exception types engines raise on a checkpoint that does not fit."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, IndexError, OSError, EOFError, AssertionError) as e:
        raise ValueError(f"checkpoint {directory} does not fit {run}: {error_reason(e)}") from None


class ShardAccess(ABC):
    """Where ReLoRA tensors live on this rank. Every rank must call every method in the same order."""

    @abstractmethod
    def full_fp32(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 values (masters where they exist) of small params, in one packed collective."""

    @abstractmethod
    def weight_pieces(self, layer: nn.Module) -> list[Piece]:
        """Writable local pieces of a ReLoRA layer's frozen W."""

    @abstractmethod
    def param_pieces(self, param: nn.Parameter) -> list[Piece]:
        """Writable local pieces of a trainable param (A or B), masters included."""

    @abstractmethod
    def state_pieces(self, param: nn.Parameter, key: str) -> list[Piece]:
        """Local pieces of an Adam state of `param`; empty where this rank holds none (yet)."""

    @abstractmethod
    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum over the ranks whose pieces are disjoint (no-op when every rank holds everything)."""

    def lora_factors(self, layers: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per layer (A32 whole, B32 rows, index of the first row): the fp32 masters a merge of this rank's
        W pieces needs. Default: whole A and B from `full_fp32` (one packed collective); engines whose W
        pieces span few rows fetch only those rows of B."""
        masters = self.full_fp32([p for layer in layers for p in (layer.lora_A, layer.lora_B)])
        return [(A32, B32, 0) for A32, B32 in zip(masters[0::2], masters[1::2])]

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        """Shape of the whole tensor (ZeRO-3 params are empty outside gathers)."""
        return param.shape

    def after_merge(self, layers: list[nn.Module]) -> None:
        """Drop engine caches of W that the merge made stale (e.g. ZeRO++ secondary partitions)."""


class Backend(ABC):
    """Training ops of one engine (single process/DDP, DeepSpeed, FSDP2, fairscale)."""

    name: str = "base"
    # For the throughput harness: no_sync() really defers the gradient reduction (DeepSpeed reduces inside
    # its own backward/step).
    defers_gradient_sync = True
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], param_groups: list[dict]) -> None:
        """Wrap `model` and build its optimizer from param groups. Called again after the warm-start phase switch."""

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

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches off the accumulation boundary (no gradient communication)."""

    def compute_only(self) -> contextlib.AbstractContextManager:
        """No gradient reduction at all, whatever the loop's sync policy: the harness's compute baseline."""
        return self.no_sync()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, *, lr: float, max_norm: float, loss_is_finite: bool = True) -> tuple[float, bool]:
        """End of an accumulation window: clip the gradients to `max_norm` (0: no clipping) and take the
        optimizer step at `lr`, unless the loss or the global gradient norm is non-finite.

        Engines that clip inside their own step (DeepSpeed) do it there. The decision must be the same
        on every rank. Returns (global gradient norm, whether the step was taken).
        """

    @abstractmethod
    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abstractmethod
    def shard_access(self) -> ShardAccess: ...

    @abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over all ranks (loss logging, evaluation)."""

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    @abstractmethod
    def save(self, directory: Path, trainer_state: dict) -> None:
        """Write model and optimizer state into `directory` (every rank calls it). Engines with their own
        checkpoint format store `trainer_state` (controller, data position) inside it as well."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (every rank calls it, after `setup`)."""

    def release_model(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        """End this engine's hold on the model and return it as a plain module with full parameters,
        ready to be re-wrapped at the warm-start switch. Engines that partition or hook the module
        return a fresh `build_model()` loaded with the full values (fp32 masters where they exist)."""
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
        """Optimizer state per parameter object, for `--keep-states-at-switch` (engines with a plain torch
        optimizer keyed by the module's own parameters implement it)."""
        raise ValueError(f"--keep-states-at-switch is not supported with --backend {self.name}")

    def restore_param_states(self, states: dict) -> None:
        if states:
            raise ValueError(f"--keep-states-at-switch is not supported with --backend {self.name}")

    def replicated_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors that must be bit-identical on every rank (all of them for replicated engines)."""
        model = self.unwrapped_model
        out = list(model.state_dict().items())
        for name, param in model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    out.append((f"{name}/{key}", value))
        return out
