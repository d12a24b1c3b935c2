"""Optimizers methods build (engines step them like any torch optimizer)."""

from .vector_step_adamw import VectorStepAdamW
from .projected_adamw import ProjectedAdamW

__all__ = ["ProjectedAdamW", "VectorStepAdamW"]
