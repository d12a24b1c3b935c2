"""Merge s*B@A into W and re-draw A, B=0: written once, on top of a backend's ShardAccess."""

from __future__ import annotations

import torch
from torch import nn

from .backends.base import Piece, ShardAccess
from .layer import ReLoRALinear, relora_layers
from .randomness import kaiming_uniform_A


ROW_BLOCK = 64


def delta_rows(start: int, numel: int, in_features: int, out_features: int) -> tuple[int, int]:
    """Rows of B that lora_delta reads for flat elements [start, start+numel) of W (ROW_BLOCK-aligned)."""
    if numel <= 0:
        return 0, 0
    row0 = start // in_features // ROW_BLOCK * ROW_BLOCK
    last = -(-(start + numel) // in_features)
    return row0, min(row0 + -(-(last - row0) // ROW_BLOCK) * ROW_BLOCK, out_features)


def lora_delta(B32: torch.Tensor, A32: torch.Tensor, scale: float, start: int = 0, numel: int | None = None,
               *, first_row: int = 0, out_features: int | None = None) -> torch.Tensor:
    """Flat elements [start, start+numel) of scale * B @ A (default: all), computing only the rows they span.

    Rows are computed in blocks aligned to multiples of ROW_BLOCK, so a given element comes out of the
    same GEMM shape whichever rank or shard asks for it: shards of W stay bit-identical to a full merge.
    `B32` may hold only rows [first_row, ...) of B (out_features rows in all) covering `delta_rows`.
    """
    out_features = first_row + B32.shape[0] if out_features is None else out_features
    in_features = A32.shape[1]
    numel = out_features * in_features - start if numel is None else numel
    row0, row1 = delta_rows(start, numel, in_features, out_features)
    if row0 < first_row or row1 > first_row + B32.shape[0]:
        raise ValueError(f"lora_delta needs rows [{row0}, {row1}) of B, has [{first_row}, {first_row + B32.shape[0]})")
    blocks = [B32[r - first_row : min(r + ROW_BLOCK, row1) - first_row] @ A32 for r in range(row0, row1, ROW_BLOCK)]
    block = torch.cat(blocks).mul_(scale).view(-1) if blocks else A32.new_zeros(0)
    offset = start - row0 * in_features
    return block[offset : offset + numel]


def add_in_fp32(view: torch.Tensor, delta: torch.Tensor) -> None:
    # Add in fp32 and round once, so a bf16 W sees one rounding per merge.
    if view.dtype == torch.float32:
        view.add_(delta.to(view.device))
    else:
        view.copy_(view.float().add_(delta.to(view.device)))


def write_pieces(pieces: list[Piece], full_flat: torch.Tensor) -> None:
    """Copy this rank's ranges of a full flat tensor into every holder of them."""
    for piece in pieces:
        src = full_flat[piece.start : piece.start + piece.numel]
        for view in piece.views:
            view.copy_(src.to(device=view.device, dtype=view.dtype))


@torch.no_grad()
def merge_and_reinit_layers(layers: list[ReLoRALinear], access: ShardAccess, *, restart_index: int) -> None:
    """W += s*B@A (fp32, from the masters), then A <- keyed Kaiming draw, B <- 0, in every holder.

    Raises before touching any W if a master is non-finite. Never gathers W.
    """
    factors = access.lora_factors(layers)
    for layer, (A32, B32, _) in zip(layers, factors):
        if not (torch.isfinite(A32).all() and torch.isfinite(B32).all()):
            raise FloatingPointError(f"non-finite lora_A/lora_B in {layer.relora_name}: merge refused, W untouched")
    for layer, (A32, B32, first_row) in zip(layers, factors):
        out_features = access.full_shape(layer.lora_B)[0]
        for piece in access.weight_pieces(layer):
            delta = lora_delta(B32, A32, layer.scale, piece.start, piece.numel, first_row=first_row, out_features=out_features)
            for view in piece.views:
                add_in_fp32(view, delta)
        A_new = kaiming_uniform_A(tuple(access.full_shape(layer.lora_A)), seed=layer.seed, restart_index=restart_index,
                                  name=layer.relora_name)
        write_pieces(access.param_pieces(layer.lora_A), A_new.view(-1))
        write_pieces(access.param_pieces(layer.lora_B), torch.zeros(access.full_shape(layer.lora_B).numel()))
    access.after_merge(layers)


class ReplicatedAccess(ShardAccess):
    """Single process and DDP: every rank holds every tensor whole; nothing to communicate."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer

    def full_fp32(self, params):
        return [p.detach().float().clone() for p in params]

    def weight_pieces(self, layer):
        return [Piece(0, [layer.weight.data.view(-1)])]

    def param_pieces(self, param):
        return [Piece(0, [param.data.view(-1)])]

    def state_pieces(self, param, key):
        # .get: never insert into the optimizer's state defaultdict (SPEC section 7).
        state = self.optimizer.state.get(param, {}) if self.optimizer is not None else {}
        tensor = state.get(key)
        return [Piece(0, [tensor.view(-1)])] if isinstance(tensor, torch.Tensor) and tensor.numel() > 1 else []

    def all_reduce_sum_(self, tensor):
        pass


def merge_and_reinit(model: nn.Module, *, restart_index: int) -> None:
    """Replicated case (single process, DDP): merge and re-init every ReLoRA layer of `model` locally.

    Bit-identical on every replica because the new A comes from a generator keyed by
    (seed, restart_index, module name), not from the global RNG.
    """
    merge_and_reinit_layers(relora_layers(model), ReplicatedAccess(), restart_index=restart_index)
