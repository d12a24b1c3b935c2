"""Merge s*B@A into W and re-draw A, B=0: written once, on the neutral access layer (`relora_dist.access`).

A rank merges the pieces of W it holds. That needs all of A but only the rows of B under those pieces:
one `fetch_fp32` brings exactly those (nothing when every rank holds everything), W is never gathered.
"""

from __future__ import annotations

import torch
from torch import nn

from ...access import ReplicatedAccess, TensorAccess, add_in_fp32, range_key, write_pieces
from ...randomness import kaiming_uniform_A
from .layer import ReLoRALinear, relora_layers

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


def lora_factors(layers: list[ReLoRALinear], access: TensorAccess) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per layer (A32 whole, B32 rows, index of the first row): the fp32 masters a merge of this rank's W pieces
    needs, in one fetch. A is NaN everywhere when any rank saw a non-finite A or B rows of that layer."""
    spans = access.spans([layer.weight for layer in layers])
    wanted = [[] for _ in range(access.world)]
    for layer, weight_spans in zip(layers, spans):
        out_features, in_features = access.full_shape(layer.weight)
        rank = access.full_shape(layer.lora_B)[1]
        for r, (lo, hi) in enumerate(weight_spans):
            row0, row1 = delta_rows(lo, hi - lo, in_features, out_features)
            wanted[r] += [(layer.lora_A, 0, access.full_shape(layer.lora_A).numel()), (layer.lora_B, row0 * rank, row1 * rank)]
    fetched = access.fetch_fp32(wanted)
    mine = wanted[access.rank]
    factors = []
    for i, layer in enumerate(layers):
        A32 = fetched[2 * i].view(access.full_shape(layer.lora_A))
        rank = access.full_shape(layer.lora_B)[1]
        factors.append((A32, fetched[2 * i + 1].view(-1, rank), mine[2 * i + 1][1] // rank))
    if any(range_key(w) != range_key(mine) for w in wanted):
        # Ranks hold different rows of B: agree on finiteness so every rank refuses a bad merge alike.
        bad = torch.tensor([float(not (A.isfinite().all() and B.isfinite().all())) for A, B, _ in factors])
        access.all_reduce_sum_(bad)
        for (A32, _, _), flag in zip(factors, bad.tolist()):
            if flag:
                A32.fill_(float("nan"))
    return factors


@torch.no_grad()
def merge_and_reinit_layers(layers: list[ReLoRALinear], access: TensorAccess, *, restart_index: int) -> None:
    """W += s*B@A (fp32, from the masters), then A <- keyed Kaiming draw, B <- 0, in every holder.

    Raises before touching any W if a master is non-finite. Never gathers W.
    """
    factors = lora_factors(layers, access)
    for layer, (A32, B32, _) in zip(layers, factors):
        if not (torch.isfinite(A32).all() and torch.isfinite(B32).all()):
            raise FloatingPointError(f"non-finite lora_A/lora_B in {layer.relora_name}: merge refused, W untouched")
    for layer, (A32, B32, first_row) in zip(layers, factors):
        out_features = access.full_shape(layer.lora_B)[0]
        for piece in access.param_pieces(layer.weight):
            delta = lora_delta(B32, A32, layer.scale, piece.start, piece.numel, first_row=first_row, out_features=out_features)
            for view in piece.views:
                add_in_fp32(view, delta)
        A_new = kaiming_uniform_A(tuple(access.full_shape(layer.lora_A)), seed=layer.seed, restart_index=restart_index,
                                  name=layer.relora_name)
        write_pieces(access.param_pieces(layer.lora_A), A_new.view(-1))
        write_pieces(access.param_pieces(layer.lora_B), torch.zeros(access.full_shape(layer.lora_B).numel()))
    access.after_write([layer.weight for layer in layers])


def merge_and_reinit(model: nn.Module, *, restart_index: int) -> None:
    """Replicated case (single process, DDP): merge and re-init every ReLoRA layer of `model` locally.

    Bit-identical on every replica because the new A comes from a generator keyed by
    (seed, restart_index, module name), not from the global RNG.
    """
    merge_and_reinit_layers(relora_layers(model), ReplicatedAccess(), restart_index=restart_index)


def merged_state_dict(state: dict[str, torch.Tensor], scale: float | None) -> dict[str, torch.Tensor]:
    """W + scale * B @ A for every (lora_A, lora_B) pair, in W's dtype; lora keys dropped."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            if scale is None:
                raise ValueError("the state dict holds lora_A/lora_B but no ReLoRA scale was given")
            weight = merged[f"{prefix}.weight"].clone()
            add_in_fp32(weight.view(-1), lora_delta(state[f"{prefix}.lora_B"].float(), state[key].float(), scale))
            merged[f"{prefix}.weight"] = weight
    return merged
