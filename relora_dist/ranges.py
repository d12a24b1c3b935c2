"""Ranges of one tensor that several ranks saved, put back together (resumes at another world size)."""

from __future__ import annotations

from typing import Iterable

import torch


def assemble_ranges(parts: Iterable[tuple[int, torch.Tensor]], length: int, *, what: str) -> torch.Tensor:
    """The whole fp32 tensor of `length` along dim 0 from (start, values) parts; a gap is an error naming `what`."""
    parts = list(parts)
    if not parts:
        raise ValueError(f"checkpoint has no {what} (a rank's file is missing)")
    whole = torch.zeros(length, *parts[0][1].shape[1:])
    covered = torch.zeros(length, dtype=torch.bool)
    for start, values in parts:
        whole[start : start + values.shape[0]] = values.float()
        covered[start : start + values.shape[0]] = True
    if not bool(covered.all()):
        raise ValueError(f"checkpoint's {what} misses {int((~covered).sum())} of {length} (a rank's file is missing)")
    return whole
