"""Replicated parameters, Adam state sharded by whole parameters (fairscale OSS, torch ZeroRedundancyOptimizer).

Each parameter's state lives whole on one owner rank (`wrapper.optim.state`); after its step each owner
broadcasts its parameters, which are views into the broadcast buckets. So a reset merges and re-inits in
place on every rank (bit-identical, no communication) and prunes where the state is: the owner holds it
whole, so its local quantile is the exact one and `ReplicatedAccess` over the owner's optimizer is the
whole recipe. Checkpoints are consolidated on rank 0 into the DDP backend's files, readable at any world size.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..access import ReplicatedAccess
from .base import Backend
from .ddp import DDPBackend


def optimizer_recipe(make_optimizer) -> tuple[type, dict]:
    """(class, defaults) of what `make_optimizer` builds: the wrappers construct the inner optimizer themselves."""
    template = make_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}])
    accepted = inspect.signature(type(template)).parameters  # defaults may hold derived keys the constructor refuses
    return type(template), {k: v for k, v in template.defaults.items() if k in accepted}


class OwnerShardedBackend(DDPBackend):
    """Shared by the OSS and ZeroRedundancyOptimizer backends; `_optimizer` is the sharding wrapper."""

    # --keep-states-at-switch would need the states from their owners: not offered (the base refuses).
    carries_states = False
    param_states = Backend.param_states
    restore_param_states = Backend.restore_param_states

    def _consolidate_on_rank0(self) -> None:
        raise NotImplementedError

    def shard_access(self):
        return ReplicatedAccess(self._optimizer.optim)  # the owner's optimizer: states of owned params only

    def replicated_named_tensors(self):
        return list(self._module.state_dict().items())  # Adam states are per owner, not replicated

    def save(self, directory, trainer_state):
        self._consolidate_on_rank0()
        if self.rank == 0:
            torch.save(self._module.state_dict(), Path(directory) / "model.pt")
            torch.save(self._optimizer.state_dict(), Path(directory) / "optimizer.pt")
