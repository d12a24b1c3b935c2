"""Merge s*B@A into W and re-draw A, B=0: written once, on top of a backend's ShardAccess."""

from __future__ import annotations

import torch
from torch import nn

from .backends.base import Piece, ShardAccess
from .layer import ReLoRALinear, relora_layers
from .randomness import kaiming_uniform_A


ROW_BLOCK = 64


def lora_delta(B32: torch.Tensor, A32: torch.Tensor, scale: float, start: int = 0, numel: int | None = None) -> torch.Tensor:
    """Flat elements [start, start+numel) of scale * B @ A (default: all), computing only the rows they span.

    Rows are computed in blocks aligned to multiples of ROW_BLOCK, so a given element comes out of the
    same GEMM shape whichever rank or shard asks for it: shards of W stay bit-identical to a full merge.
    """
    out_features, in_features = B32.shape[0], A32.shape[1]
    numel = out_features * in_features - start if numel is None else numel
    row0 = start // in_features // ROW_BLOCK * ROW_BLOCK
    row1 = min(-(-(start + numel) // in_features), out_features)
    blocks = [B32[r : min(r + ROW_BLOCK, out_features)] @ A32 for r in range(row0, row1, ROW_BLOCK)]
    block = torch.cat(blocks).mul_(scale).view(-1) if blocks else A32.new_zeros(0)
    offset = start - row0 * in_features
    return block[offset : offset + numel]


def add_in_fp32(view: torch.Tensor, delta: torch.Tensor) -> None:
    # Add in fp32 and round once, so a bf16 W sees one rounding per merge.
    if view.dtype == torch.float32:
        view.add_(delta.to(view.device))
    else:
        view.copy_(view.float().add_(delta.to(view.device)))


def _write(pieces: list[Piece], full_flat: torch.Tensor) -> None:
    for piece in pieces:
        src = full_flat[piece.start : piece.start + piece.numel]
        for view in piece.views:
            view.copy_(src.to(device=view.device, dtype=view.dtype))


@torch.no_grad()
def merge_and_reinit_layers(layers: list[ReLoRALinear], access: ShardAccess, *, restart_index: int) -> None:
    """W += s*B@A (fp32, from the masters), then A <- keyed Kaiming draw, B <- 0, in every holder.

    Raises before touching any W if a master is non-finite. Never gathers W.
    """
    masters = access.full_fp32([p for layer in layers for p in (layer.lora_A, layer.lora_B)])
    for layer, A32, B32 in zip(layers, masters[0::2], masters[1::2]):
        if not (torch.isfinite(A32).all() and torch.isfinite(B32).all()):
            raise FloatingPointError(f"non-finite lora_A/lora_B in {layer.relora_name}: merge refused, W untouched")
    for layer, A32, B32 in zip(layers, masters[0::2], masters[1::2]):
        for piece in access.weight_pieces(layer):
            delta = lora_delta(B32, A32, layer.scale, piece.start, piece.numel)
            for view in piece.views:
                add_in_fp32(view, delta)
        A_new = kaiming_uniform_A(tuple(access.full_shape(layer.lora_A)), seed=layer.seed, restart_index=restart_index,
                                  name=layer.relora_name)
        _write(access.param_pieces(layer.lora_A), A_new.view(-1))
        _write(access.param_pieces(layer.lora_B), torch.zeros(access.full_shape(layer.lora_B).numel()))
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
