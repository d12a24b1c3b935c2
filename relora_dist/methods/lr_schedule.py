"""The learning-rate schedule every method's `lr` is built on: warm-up, one global cosine and, for the methods that
restart (ReLoRA), jagged restarts from 0 on that envelope."""

from __future__ import annotations

import math


def jagged_cosine(
    step: int,
    *,
    total_steps: int,
    first_warmup: int,
    restart_warmup: int = 0,
    cycle_length: int | None = None,
    min_lr_ratio: float = 0.1,
) -> float:
    """LR factor at update `step` (0-based) of a schedule over `total_steps` updates (SPEC section 1).

    Linear warm-up over `first_warmup`, one global cosine down to `min_lr_ratio`; at every multiple
    of `cycle_length` the factor drops to exactly 0 and climbs linearly back to the envelope in
    `restart_warmup` steps. `cycle_length=None` gives a plain warm-up + cosine.
    """

    def envelope(u: float) -> float:
        progress = (u - first_warmup) / max(1, total_steps - first_warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if step < first_warmup:
        return step / max(1, first_warmup)
    if cycle_length:
        since_restart, restart = step % cycle_length, step // cycle_length
        if step >= cycle_length and since_restart < restart_warmup:
            return since_restart / max(1, restart_warmup) * envelope(restart * cycle_length + restart_warmup)
    return envelope(step)
