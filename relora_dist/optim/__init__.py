"""Optimizers methods build (engines step them like any torch optimizer)."""

from .projected_adamw import ProjectedAdamW

__all__ = ["ProjectedAdamW"]
