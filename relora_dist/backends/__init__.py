"""Engine registry: one module per backend, imported lazily so optional engines stay optional."""

from __future__ import annotations

import torch

from .base import Backend, Piece, ShardAccess

BACKENDS = ("ddp", "deepspeed", "fsdp2", "fairscale", "zero_redundancy")


def build_backend(name: str, *, device: torch.device, dtype: str, **engine_options) -> Backend:
    """`engine_options`: what a particular engine needs beyond device and dtype (DeepSpeed: config,
    micro_batch_size, accumulation_steps, max_norm; FSDP2: reshard_after_forward; DDP and
    ZeroRedundancyOptimizer: the throughput harness's count_gradient_bytes, allreduce_every_microbatch,
    emulate_busbw); others are ignored."""
    ddp_options = {k: engine_options[k] for k in ("count_gradient_bytes", "allreduce_every_microbatch", "emulate_busbw")
                   if k in engine_options}
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend(device=device, dtype=dtype, **ddp_options)
    if name == "fsdp2":
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend(device=device, dtype=dtype, reshard_after_forward=engine_options.get("reshard_after_forward", True))
    if name == "fairscale":
        from .fairscale import FairscaleBackend

        return FairscaleBackend(device=device, dtype=dtype)
    if name == "zero_redundancy":
        from .zero_redundancy import ZeroRedundancyBackend

        return ZeroRedundancyBackend(device=device, dtype=dtype, **ddp_options)
    if name == "deepspeed":
        try:
            from .deepspeed import DeepSpeedBackend
        except ImportError as e:
            raise ValueError(f"--backend deepspeed needs the deepspeed package ({e})") from None
        wanted = ("config", "micro_batch_size", "accumulation_steps", "max_norm")
        return DeepSpeedBackend(device=device, dtype=dtype, **{k: engine_options[k] for k in wanted})
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (--backend)")


__all__ = ["Backend", "Piece", "ShardAccess", "BACKENDS", "build_backend"]
