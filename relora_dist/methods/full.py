"""Full-rank training: the model as built, every weight trains (the paper's baseline)."""

from __future__ import annotations

from .base import Method, register_method


@register_method
class FullRank(Method):
    name = "full"
    description = "the full-rank model"
