"""Engine registry: one module per backend, imported lazily so optional engines stay optional."""

from __future__ import annotations

import torch

from .base import Backend, Piece, ShardAccess

BACKENDS = ("ddp",)


def build_backend(name: str, *, device: torch.device, dtype: str) -> Backend:
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend(device=device, dtype=dtype)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (--backend)")


__all__ = ["Backend", "Piece", "ShardAccess", "BACKENDS", "build_backend"]
