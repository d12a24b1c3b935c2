"""Prune the Adam states of A and B at a ReLoRA reset: reset / random / magnitude (SPEC section 1).

Default semantics use one joint mask per tensor so exp_avg is zeroed wherever exp_avg_sq is (otherwise
the first post-reset step moves those entries by lr*m/eps). `reference=True` reproduces the authors'
code: independent masks per state key, magnitude thresholds per key.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ...access import Piece, ReplicatedAccess, TensorAccess
from ...randomness import keep_mask
from .quantile import abs_quantiles

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _apply(pieces: list[Piece], keep_flat: torch.Tensor) -> None:
    for piece in pieces:
        keep = keep_flat[piece.start : piece.start + piece.numel]
        for view in piece.views:
            view.mul_(keep.to(device=view.device, dtype=view.dtype))


def _threshold_keep(pieces: list[Piece], numel: int, threshold: float) -> torch.Tensor:
    """Full-length keep mask (True where |x| > threshold) for this rank's pieces; other entries True."""
    keep = torch.ones(numel, dtype=torch.bool)
    thr = torch.tensor(threshold, dtype=torch.float32)
    for piece in pieces:
        local = piece.views[0].detach().float().abs().cpu()
        keep[piece.start : piece.start + piece.numel] = local > thr.to(piece.views[0].dtype).float()
    return keep


@torch.no_grad()
def prune_states(
    named_params: list[tuple[str, nn.Parameter]],
    access: TensorAccess,
    *,
    rule: str,
    ratio: float,
    seed: int,
    restart_index: int,
    reference: bool = False,
) -> dict[str, float]:
    """Prune exp_avg/exp_avg_sq of the given params in place by `rule` (reset, random, magnitude). Returns
    {"zeroed": local fraction zeroed}."""
    state = {name: {key: access.state_pieces(p, key) for key in ADAM_KEYS} for name, p in named_params}
    numels = {name: access.full_shape(p).numel() for name, p in named_params}

    if rule == "reset":
        masks = {(name, key): torch.zeros(numels[name], dtype=torch.bool) for name, _ in named_params for key in ADAM_KEYS}
    elif rule == "random":
        masks = {}
        for name, _ in named_params:
            if reference:
                for key in ADAM_KEYS:
                    masks[name, key] = keep_mask(numels[name], ratio, seed=seed, restart_index=restart_index, name=name, key=key)
            else:
                joint = keep_mask(numels[name], ratio, seed=seed, restart_index=restart_index, name=name, key="joint")
                masks.update({(name, key): joint for key in ADAM_KEYS})
    elif rule == "magnitude":
        # Same item list on every rank (built from the params, not from what is local): collectives align.
        keys = ADAM_KEYS if reference else ("exp_avg_sq",)
        items = [(name, key) for name, _ in named_params for key in keys]
        thresholds = abs_quantiles(
            [[pc.views[0] for pc in state[name][key]] for name, key in items],
            [numels[name] for name, _ in items],
            ratio,
            access.all_reduce_sum_,
        )
        masks = {}
        for (name, key), thr in zip(items, thresholds):
            keep = _threshold_keep(state[name][key], numels[name], thr)
            if reference:
                masks[name, key] = keep
            else:
                masks.update({(name, k): keep for k in ADAM_KEYS})
    else:
        raise ValueError(f"unknown prune rule {rule!r}")

    zeroed = total = 0
    for name, _ in named_params:
        for key in ADAM_KEYS:
            pieces = state[name][key]
            _apply(pieces, masks[name, key])
            for piece in pieces:
                total += piece.numel
                zeroed += int((piece.views[0] == 0).sum())
    return {"zeroed": zeroed / total if total else 0.0}


def prune_adam_states(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter | tuple[str, nn.Parameter]],
    *,
    rule: str | None = None,
    ratio: float,
    restart_index: int,
    seed: int = 0,
    reference: bool = False,
    method: str | None = None,
) -> dict[str, float]:
    """Replicated case (single process, DDP): prune the Adam states of `params` held by `optimizer`.

    `params` are parameters or (name, parameter) pairs; names key the random masks, so pass the same
    names on every rank (relora_dist.lora_parameters(model) gives stable ones). `method=` is the keyword's old
    name (before the training methods took that word), still accepted with a DeprecationWarning.
    """
    if method is not None:
        if rule is not None:
            raise TypeError("prune_adam_states got both rule= and its deprecated alias method=")
        warnings.warn("prune_adam_states(method=...) is deprecated: use rule=", DeprecationWarning, stacklevel=2)
        rule = method
    if rule is None:
        raise TypeError("prune_adam_states() missing the keyword argument 'rule'")
    named = [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(params)]
    return prune_states(
        named, ReplicatedAccess(optimizer), rule=rule, ratio=ratio, seed=seed, restart_index=restart_index, reference=reference
    )
