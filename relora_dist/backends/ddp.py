"""Single process and torch DDP: replicated model, plain torch optimizer, local merge and prune."""

from __future__ import annotations

import contextlib
import math
import inspect
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..comm import GradientTraffic, counting_allreduce_hook
from ..merge import ReplicatedAccess
from .base import Backend, checkpoint_must_fit, load_checkpoint_file


def _no_buffer_broadcast() -> dict:
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

    def __init__(self, *, device: torch.device, dtype: str = "fp32", count_gradient_bytes: bool = False,
                 allreduce_every_microbatch: bool = False, emulate_busbw: float | None = None):
        self.device = device
        self.dtype = dtype
        # Throughput harness options: count what DDP all-reduces (a comm hook equivalent to none), and
        # reproduce the paper's loop, which all-reduces after every micro-batch (no no_sync).
        self.gradient_traffic = GradientTraffic(emulate_busbw) if count_gradient_bytes or emulate_busbw else None
        self.allreduce_every_microbatch = allreduce_every_microbatch
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, model, make_optimizer, param_groups):
        self._module = model.to(self.device)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_broadcast())
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

    def backward(self, loss):
        loss.backward()

    def step(self, *, lr, max_norm, loss_is_finite=True):
        params = [p for p in self._module.parameters() if p.requires_grad]
        # DDP already averaged the gradients, so the norm is the same on every rank.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            self.set_lr(lr)
            self._optimizer.step()
        return grad_norm, stepped

    def zero_grad(self):
        self._optimizer.zero_grad(set_to_none=True)

    def shard_access(self):
        return ReplicatedAccess(self._optimizer)

    def param_states(self, params):
        return {p: dict(self._optimizer.state[p]) for p in params if p in self._optimizer.state}

    def restore_param_states(self, states):
        for param, state in states.items():
            self._optimizer.state[param] = state

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def save(self, directory: Path, trainer_state: dict):
        if self.rank == 0:
            torch.save(self._module.state_dict(), directory / "model.pt")
            torch.save(self._optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path):
        model, optimizer = (load_checkpoint_file(directory / name, self.device) for name in ("model.pt", "optimizer.pt"))
        with checkpoint_must_fit(directory):
            self._module.load_state_dict(model)
            self._optimizer.load_state_dict(optimizer)
