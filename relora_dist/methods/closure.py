"""What every optimizer's step does with torch's optional closure."""

from __future__ import annotations

import torch


def evaluate_closure(closure):
    """The loss of `closure` (recomputed with gradients enabled), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
