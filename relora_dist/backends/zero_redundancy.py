"""torch DDP + `ZeroRedundancyOptimizer`: torch's maintained equivalent of fairscale OSS.

DDP all-reduces whole gradients; the optimizer state is sharded by whole parameters, each owner steps
its parameters and broadcasts them. The reset is OSS's: local merge on every rank, prune on the owner.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from .ddp import DDPBackend
from .fairscale import load_replicated_checkpoint, optimizer_recipe
from .sharded import OwnerStates


class ZeroRedundancyBackend(DDPBackend):
    name = "zero_redundancy"

    def setup(self, model, make_optimizer, param_groups):
        self.ensure_process_group()  # ZeroRedundancyOptimizer needs one even in a plain single process
        optimizer_class, defaults = optimizer_recipe(make_optimizer)
        super().setup(model, lambda groups: ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **defaults),
                      param_groups)

    def shard_access(self):
        return OwnerStates(self._optimizer.optim)

    def replicated_named_tensors(self):
        return list(self._module.state_dict().items())  # Adam states are per owner, not replicated

    def param_states(self, params):
        raise ValueError("--keep-states-at-switch is not supported with --backend zero_redundancy")

    def save(self, directory, trainer_state):
        self._optimizer.consolidate_state_dict(to=0)
        if self.rank == 0:
            torch.save(self._module.state_dict(), Path(directory) / "model.pt")
            torch.save(self._optimizer.state_dict(), Path(directory) / "optimizer.pt")

    def load(self, directory):
        load_replicated_checkpoint(self, directory, self._optimizer)
