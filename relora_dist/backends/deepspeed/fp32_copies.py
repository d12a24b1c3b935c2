"""fp32 copies of the frozen parameters a method writes in place often, for DeepSpeed runs in bf16.

DeepSpeed's bf16 engines cast every parameter to bf16 and keep an fp32 master only of what the optimizer steps. A
frozen parameter that a method writes every update (SwitchLoRA folds switched vectors into W and parks them in its
pools, `access.fp32_frozen_parameters`) would be rounded at every write. Such a parameter gets an fp32 copy of the
flat range this rank holds, taken from the model before DeepSpeed casts it: fetches read the copy, writes reach it
with every other holder (it is the first view of its pieces), and `after_write` rounds it into the bf16 holders, so
the forward sees bf16(exact W) and ZeRO-3 still gathers bf16. The copies travel beside DeepSpeed's checkpoint, one
file per rank holding the flat ranges that rank owns, by parameter name: any world size reassembles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ...access import Piece
from ..base import load_checkpoint_file
from ...ranges import assemble_ranges

SHADOW_FILE = "frozen_fp32_rank{}.pt"


@dataclass
class _Copy:
    name: str
    start: int  # first flat element of the full tensor that `values` holds
    values: torch.Tensor  # fp32, flat
    saved: tuple[int, int]  # the flat range this rank saves (every element is saved by exactly one rank)
    numel: int  # of the full tensor


class FrozenShadows:
    """This rank's fp32 copies of the shadowed frozen parameters (see the module docstring)."""

    def __init__(self, copies: dict[int, _Copy] | None = None):
        self.copies = copies or {}

    def __contains__(self, param: nn.Parameter) -> bool:
        return id(param) in self.copies

    def __bool__(self) -> bool:
        return bool(self.copies)

    @classmethod
    def place(cls, values: dict[str, torch.Tensor], module: nn.Module,
              ranges: Callable[[nn.Parameter], tuple[tuple[int, int], tuple[int, int]]], device) -> "FrozenShadows":
        """Copies of the full fp32 `values` (taken before the engine cast them) over the flat range this rank holds;
        `ranges(param)` is (held, saved)."""
        params = dict(module.named_parameters())
        copies = {}
        for name, value in values.items():
            param, flat = params[name], value.reshape(-1)
            (lo, hi), saved = ranges(param)
            copies[id(param)] = _Copy(name, lo, flat[lo:hi].to(device, torch.float32).clone(), saved, flat.numel())
        return cls(copies)

    def covering(self, param: nn.Parameter, start: int, numel: int) -> torch.Tensor | None:
        """The copy's view of flat elements [start, start + numel), or None where this rank's copy lacks them."""
        copy = self.copies.get(id(param))
        if copy is None or start < copy.start or start + numel > copy.start + copy.values.numel():
            return None
        return copy.values.narrow(0, start - copy.start, numel)

    def with_copy(self, param: nn.Parameter, pieces: list[Piece]) -> list[Piece]:
        """The pieces with the fp32 copy as their first holder where it covers them."""
        out = []
        for piece in pieces:
            copy = self.covering(param, piece.start, piece.numel)
            out.append(piece if copy is None else Piece(piece.start, [copy] + piece.views))
        return out

    def round_into_holders(self, param: nn.Parameter, pieces: list[Piece]) -> None:
        """After a write: every other holder of a covered piece takes the copy's value (one rounding, from exact)."""
        for piece in pieces:
            copy = self.covering(param, piece.start, piece.numel)
            for view in piece.views if copy is not None else ():
                if view.data_ptr() != copy.data_ptr():
                    view.copy_(copy.to(view.device, view.dtype))

    def take_from_holders(self, param: nn.Parameter, pieces: list[Piece]) -> None:
        """The copy takes the low-precision holder's value (a checkpoint without copies: what it has)."""
        for piece in pieces:
            copy = self.covering(param, piece.start, piece.numel)
            holders = [view for view in piece.views if copy is not None and view.data_ptr() != copy.data_ptr()]
            if holders:
                copy.copy_(holders[0])

    def tensors(self) -> list[torch.Tensor]:
        return [c.values for c in self.copies.values()]

    def replicated(self) -> list[tuple[str, torch.Tensor]]:
        """The copies this rank holds whole, which every rank then holds whole (for the replica check)."""
        return [(f"{c.name}/fp32", c.values) for c in self.copies.values() if c.values.numel() == c.numel]

    def save(self, directory: Path, rank: int) -> None:
        """This rank's saved ranges, by name (no file where it saves none)."""
        records = {c.name: {"lo": c.saved[0], "numel": c.numel,
                            "values": c.values.narrow(0, c.saved[0] - c.start, c.saved[1] - c.saved[0]).cpu().clone()}
                   for c in self.copies.values() if c.saved[1] > c.saved[0]}
        if records:
            torch.save(records, Path(directory) / SHADOW_FILE.format(rank))


def saved_shadows(directory: Path) -> dict[str, torch.Tensor]:
    """Full flat fp32 values by parameter name, put together from every saved rank's ranges (empty: no records)."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    numels: dict[str, int] = {}
    for file in sorted(Path(directory).glob(SHADOW_FILE.format("*"))):
        for name, record in load_checkpoint_file(file).items():
            pieces.setdefault(name, []).append((record["lo"], record["values"]))
            numels[name] = record["numel"]
    return {name: assemble_ranges(parts, numels[name], what=f"fp32 copy of {name}") for name, parts in pieces.items()}
