"""fairscale OSS + ShardedDataParallel: replicated parameters, optimizer state sharded by whole parameters.

ShardedDDP reduces each gradient to its owner only; the reset is the owner-sharded one (`owner_sharded`).
fairscale's own FSDP asserts CUDA and is out of scope: use `--backend fsdp2` for parameter sharding.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch

from .base import NoOptions
from .owner_sharded import OwnerShardedBackend, optimizer_recipe


class _QuietModeSwitch(logging.Filter):
    """ShardedDDP warns on the root logger at every train/eval switch (each evaluation): expected here."""

    def filter(self, record):
        return "ShardedDDP detected that the trainable params changed" not in record.getMessage()


class FairscaleBackend(OwnerShardedBackend):
    """`dtype="bf16"` is autocast over fp32 parameters, as with DDP (OSS has no separate masters)."""

    name = "fairscale"
    Options = NoOptions
    options_section = None

    def __init__(self, *, device: torch.device, dtype: str = "fp32", micro_batch_size: int = 1, accumulation_steps: int = 1,
                 max_norm: float = 1.0):
        self.check_options(NoOptions())
        super().__init__(device=device, dtype=dtype, micro_batch_size=micro_batch_size,
                         accumulation_steps=accumulation_steps, max_norm=max_norm)

    @classmethod
    def check_options(cls, options, **run):
        if importlib.util.find_spec("fairscale") is None:
            raise ValueError("--backend fairscale needs the fairscale package (pip install fairscale)")

    def setup(self, model, make_optimizer, param_groups):
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        self.ensure_process_group()  # OSS and ShardedDDP need one even in a plain single process
        root = logging.getLogger()
        if not any(isinstance(f, _QuietModeSwitch) for f in root.filters):
            root.addFilter(_QuietModeSwitch())
        self._module = model.to(self.device)
        optimizer_class, defaults = optimizer_recipe(make_optimizer)
        self._optimizer = OSS(param_groups, optim=optimizer_class, **defaults)
        self._wrapped = ShardedDataParallel(model, self._optimizer)

    def release_model(self, build_model):
        # ShardedDDP's gradient hooks stay on the parameters: hand over a fresh module instead.
        state = {k: v.detach().clone() for k, v in self._module.state_dict().items()}
        self._module = self._wrapped = self._optimizer = None
        return self.rebuilt_model(build_model, state)

    def no_sync(self):
        return self._wrapped.no_sync()

    def clip_gradients(self, max_norm):
        # The gradients sit on their owners only: OSS computes the global norm (one all-reduce) and clips.
        return float(self._optimizer.clip_grad_norm(max_norm if max_norm > 0 else math.inf))

    def zero_grad(self):
        self._wrapped.zero_grad(set_to_none=True)

    def _consolidate_on_rank0(self):
        self._optimizer.consolidate_state_dict(recipient_rank=0)
