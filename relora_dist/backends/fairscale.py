"""fairscale OSS + ShardedDataParallel: replicated parameters, optimizer state sharded by whole parameters.

Each parameter's Adam state lives on one owner rank (`oss.optim.state`); after `step()` each owner
broadcasts its parameters, which are views into broadcast buckets. So the reset merges and re-inits
in place on every rank (bit-identical, no communication) and prunes only on the owner (`OwnerStates`).
Checkpoints are consolidated on rank 0 in the same files as the DDP backend (any world size resumes them).
fairscale's own FSDP asserts CUDA and is out of scope: use `--backend fsdp2` for parameter sharding.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from .base import Backend
from .sharded import OwnerStates


class _QuietModeSwitch(logging.Filter):
    """ShardedDDP warns on the root logger at every train/eval switch (each evaluation): expected here."""

    def filter(self, record):
        return "ShardedDDP detected that the trainable params changed" not in record.getMessage()


def optimizer_recipe(make_optimizer) -> tuple[type, dict]:
    """(class, defaults) of what `make_optimizer` builds: wrappers like OSS construct the inner optimizer themselves."""
    template = make_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}])
    accepted = inspect.signature(type(template)).parameters  # defaults may hold derived keys the constructor refuses
    return type(template), {k: v for k, v in template.defaults.items() if k in accepted}


def load_replicated_checkpoint(backend: Backend, directory: Path, optimizer) -> None:
    """model.pt + a consolidated optimizer.pt, read by every rank (the wrapper keeps what it owns)."""
    try:
        backend.unwrapped_model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location=backend.device, weights_only=True))
        optimizer.load_state_dict(torch.load(Path(directory) / "optimizer.pt", map_location=backend.device, weights_only=True))
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, IndexError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {directory} does not fit this run: {reason}") from None


class FairscaleBackend(Backend):
    """`dtype="bf16"` is autocast over fp32 parameters, as with DDP (OSS has no separate masters)."""

    name = "fairscale"

    def __init__(self, *, device: torch.device, dtype: str = "fp32"):
        try:
            import fairscale  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--backend fairscale needs the fairscale package ({e})") from None
        self.device = device
        self.dtype = dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._module = self._wrapped = self._oss = None

    def setup(self, model, make_optimizer, param_groups):
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        self.ensure_process_group()  # OSS and ShardedDDP need one even in a plain single process
        root = logging.getLogger()
        if not any(isinstance(f, _QuietModeSwitch) for f in root.filters):
            root.addFilter(_QuietModeSwitch())
        self._module = model.to(self.device)
        optimizer_class, defaults = optimizer_recipe(make_optimizer)
        self._oss = OSS(param_groups, optim=optimizer_class, **defaults)
        self._wrapped = ShardedDataParallel(model, self._oss)

    def release_model(self, build_model):
        # ShardedDDP's gradient hooks stay on the parameters: hand over a fresh module instead.
        state = {k: v.detach().clone() for k, v in self._module.state_dict().items()}
        self._module = self._wrapped = self._oss = None
        return self.rebuilt_model(build_model, state)

    @property
    def model(self):
        return self._wrapped

    @property
    def unwrapped_model(self):
        return self._module

    @property
    def optimizer(self):
        return self._oss

    def forward_context(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self):
        return self._wrapped.no_sync()

    def backward(self, loss):
        loss.backward()

    def step(self, *, lr, max_norm, loss_is_finite=True):
        # The gradients sit on their owners only: OSS computes the global norm (one all-reduce) and clips.
        norm = float(self._oss.clip_grad_norm(max_norm if max_norm > 0 else math.inf))
        stepped = loss_is_finite and math.isfinite(norm)
        if stepped:
            self.set_lr(lr)
            self._oss.step()
        return norm, stepped

    def zero_grad(self):
        self._wrapped.zero_grad(set_to_none=True)

    def shard_access(self):
        return OwnerStates(self._oss.optim)

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def replicated_named_tensors(self):
        return list(self._module.state_dict().items())  # Adam states are per owner, not replicated

    def param_states(self, params):
        raise ValueError("--keep-states-at-switch is not supported with --backend fairscale")

    def save(self, directory, trainer_state):
        self._oss.consolidate_state_dict(recipient_rank=0)
        if self.rank == 0:
            torch.save(self._module.state_dict(), Path(directory) / "model.pt")
            torch.save(self._oss.state_dict(), Path(directory) / "optimizer.pt")

    def load(self, directory):
        load_replicated_checkpoint(self, directory, self._oss)
