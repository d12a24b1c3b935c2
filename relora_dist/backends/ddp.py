"""Single process and torch DDP: replicated model, plain torch optimizer, local merge and prune."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..access import ReplicatedAccess
from ..comm import GradientTraffic, counting_allreduce_hook
from .base import Backend, checkpoint_must_fit, clip_replicated_gradients, load_checkpoint_file


@dataclass
class DDPOptions:
    allreduce_every_microbatch: bool = False
    """ddp, zero_redundancy: all-reduce the gradients after every micro-batch (the paper's loop, no no_sync)."""
    count_gradient_bytes: bool = False
    """ddp, zero_redundancy: route DDP's all-reduces through a counting comm hook (equivalent to none; the throughput harness)."""
    emulate_busbw: float | None = None
    """ddp, zero_redundancy: pad every gradient all-reduce to this bus bandwidth in bytes/s (slow-link emulation)."""


def no_buffer_broadcast() -> dict:
    # LLaMA's only buffers (rotary frequencies) are identical everywhere: skip the per-forward broadcast.
    # torch 2.13 renamed the switch; older releases only know broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class DDPBackend(Backend):
    """World size 1 runs the bare model; larger worlds wrap it in DDP (gloo on CPU, NCCL on GPUs).

    `dtype="bf16"` is autocast mixed precision over fp32 parameters (the fp32 params are the masters).
    """

    name = "ddp"
    Options = DDPOptions
    options_section = "ddp"
    carries_states = True
    adopts_bare_modules = True

    def __init__(self, *, device: torch.device, dtype: str = "fp32", count_gradient_bytes: bool = False,
                 allreduce_every_microbatch: bool = False, emulate_busbw: float | None = None, **batch):
        super().__init__(device=device, dtype=dtype, **batch)
        # Throughput harness options: count what DDP all-reduces (a comm hook equivalent to none), and
        # reproduce the paper's loop, which all-reduces after every micro-batch (no no_sync).
        self.gradient_traffic = GradientTraffic(emulate_busbw) if count_gradient_bytes or emulate_busbw else None
        self.allreduce_every_microbatch = allreduce_every_microbatch
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def adopt(cls, wrapped, optimizer, *, dtype="fp32", fp32_values=None):
        replicated = isinstance(wrapped, DistributedDataParallel)
        module = wrapped.module if replicated else wrapped
        backend = cls(device=next(module.parameters()).device, dtype=dtype)
        if not replicated and backend.world_size > 1:
            return None  # a bare module in a larger world is another engine's
        backend._module, backend._wrapped, backend._optimizer = module, wrapped, optimizer
        return backend

    def setup(self, model, make_optimizer, param_groups):
        self._module = model.to(self.device)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(model, device_ids=device_ids, **no_buffer_broadcast())
            if self.gradient_traffic is not None:
                self._wrapped.register_comm_hook(self.gradient_traffic, counting_allreduce_hook)
        else:
            self._wrapped = model
        self._optimizer = make_optimizer(param_groups)

    @property
    def model(self):
        return self._wrapped

    @property
    def unwrapped_model(self):
        return self._module

    @property
    def optimizer(self):
        return self._optimizer

    def forward_context(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self):
        if isinstance(self._wrapped, DistributedDataParallel) and not self.allreduce_every_microbatch:
            return self._wrapped.no_sync()
        return contextlib.nullcontext()

    def compute_only(self):
        return self._wrapped.no_sync() if isinstance(self._wrapped, DistributedDataParallel) else contextlib.nullcontext()

    def clip_gradients(self, max_norm):
        # DDP already averaged the gradients, so the norm is the same on every rank.
        return clip_replicated_gradients([p for p in self._module.parameters() if p.requires_grad], max_norm)

    def zero_grad(self):
        self._optimizer.zero_grad(set_to_none=True)

    def shard_access(self):
        return ReplicatedAccess(self._optimizer)

    def param_states(self, params):
        return {p: dict(self._optimizer.state[p]) for p in params if p in self._optimizer.state}

    def restore_param_states(self, states):
        for param, state in states.items():
            self._optimizer.state[param] = state

    def save(self, directory: Path, trainer_state: dict):
        if self.rank == 0:
            torch.save(self._module.state_dict(), directory / "model.pt")
            torch.save(self._optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path):
        model, optimizer = (load_checkpoint_file(directory / name, self.device) for name in ("model.pt", "optimizer.pt"))
        with checkpoint_must_fit(directory):
            self._module.load_state_dict(model)
            self._optimizer.load_state_dict(optimizer)
