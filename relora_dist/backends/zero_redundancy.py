"""torch DDP + `ZeroRedundancyOptimizer`: torch's maintained equivalent of fairscale OSS.

DDP all-reduces whole gradients; the optimizer state is sharded by whole parameters, each owner steps
its parameters and broadcasts them. The reset is OSS's (see `owner_sharded`).
"""

from __future__ import annotations

from torch.distributed.optim import ZeroRedundancyOptimizer

from .owner_sharded import OwnerShardedBackend, optimizer_recipe


class ZeroRedundancyBackend(OwnerShardedBackend):
    name = "zero_redundancy"

    def setup(self, model, make_optimizer, param_groups):
        self.ensure_process_group()  # ZeroRedundancyOptimizer needs one even in a plain single process
        optimizer_class, defaults = optimizer_recipe(make_optimizer)
        super().setup(model, lambda groups: ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **defaults),
                      param_groups)

    def _consolidate_on_rank0(self):
        self._optimizer.consolidate_state_dict(to=0)
