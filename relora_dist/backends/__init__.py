"""Engine registry: one module per backend, imported lazily so optional engines stay optional."""

from __future__ import annotations

import torch

from .base import Backend, Piece, ShardAccess

BACKENDS = ("ddp", "deepspeed")


def build_backend(name: str, *, device: torch.device, dtype: str, **engine_options) -> Backend:
    """`engine_options`: what a particular engine needs beyond device and dtype (DeepSpeed: config,
    micro_batch_size, accumulation_steps, max_norm); engines that need none ignore them."""
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend(device=device, dtype=dtype)
    if name == "deepspeed":
        try:
            from .deepspeed import DeepSpeedBackend
        except ImportError as e:
            raise ValueError(f"--backend deepspeed needs the deepspeed package ({e})") from None
        return DeepSpeedBackend(device=device, dtype=dtype, **engine_options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (--backend)")


__all__ = ["Backend", "Piece", "ShardAccess", "BACKENDS", "build_backend"]
