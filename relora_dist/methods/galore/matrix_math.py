"""GaLore / Fira's per-matrix math, wherever the matrix lives: the HF-style Adam moments and step size, the projector
(top-r singular vectors with a fixed sign convention, a fixed random basis where the gradient gives none), Fira's
scaling phi and its norm-growth limiter, and the checks of a projected group's settings.

Nothing here communicates or knows a layout: `optimizer.py` applies it to whole matrices and FSDP2 row shards,
`flat_partition.py` to the rows inside DeepSpeed's flat partitions.
"""

from __future__ import annotations

import math

import torch

PROJECTIONS = ("std", "right", "left")
RESIDUALS = ("none", "fira")
PROJECTED_KEYS = ("rank", "update_gap", "scale", "proj", "residual", "limiter")


# -- Adam -----------------------------------------------------------------------------------------------
def adam_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """HF-style Adam moments updated in place with `grad`; returns m / (sqrt(v) + eps)."""
    beta1, beta2 = group["betas"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(group["eps"])


def step_size(group: dict, step: torch.Tensor) -> float:
    """lr sqrt(1 - b2^t) / (1 - b1^t) after `step` updates."""
    beta1, beta2 = group["betas"]
    t = float(step)
    return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


# -- the subspace ---------------------------------------------------------------------------------------
def projects_left(proj: str, m: int, n: int) -> bool:
    """Whether an (m x n) matrix is projected from the left under --galore-proj `proj`: std picks the smaller side
    (left when m < n, as the official code), whatever engine holds the matrix."""
    return proj == "left" or (proj == "std" and m < n)


def fix_signs(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip each singular vector (a row for dim=1, a column for dim=0) so that its largest-magnitude entry is positive."""
    index = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, index))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def random_orthonormal(rows: int, cols: int) -> torch.Tensor:
    """A fixed orthonormal (rows x cols) basis with orthonormal rows (rows <= cols), the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float32))
    return q.T.contiguous()


def svd_projector(grad: torch.Tensor, rank: int, left: bool, previous: torch.Tensor | None) -> torch.Tensor:
    """P for the whole fp32 gradient `grad`: the top-`rank` left (m x r) or right (r x n) singular vectors, signs
    fixed. A non-finite gradient keeps `previous`, and a zero one too (a fixed random basis when there is none yet)."""
    r = min(rank, *grad.shape)
    finite = bool(torch.isfinite(grad).all())
    if not finite or not bool(grad.any()):
        if previous is not None:
            return previous
        basis = random_orthonormal(r, grad.shape[0] if left else grad.shape[1])
        return basis.T.contiguous() if left else basis
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return fix_signs(u[:, :r], dim=0).contiguous() if left else fix_signs(vh[:r], dim=1).contiguous()


# -- Fira -----------------------------------------------------------------------------------------------
def fira_scaling(normalized: torch.Tensor, projected: torch.Tensor, left: bool) -> torch.Tensor:
    """Fira's phi = |N| / (|R| + 1e-8) over the rank dimension: (1, n), one per column, for a left projection (r x n);
    (m, 1), one per row, for a right one (m x r)."""
    dim = 0 if left else 1
    phi = torch.norm(normalized, dim=dim) / (torch.norm(projected, dim=dim) + 1e-8)
    return phi.unsqueeze(0) if left else phi.unsqueeze(1)


def limit_residual(state: dict, residual: torch.Tensor, norm: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fira's norm-growth limiter on one matrix, whose residual S has norm `norm` (|S|_F over every rank holding
    rows of it): |S| may grow by at most gamma per step (the first step is unlimited). Keeps the norm in
    `state["scaling_grad"]`; returns S limited."""
    if "scaling_grad" not in state:
        state["scaling_grad"] = norm
        return residual
    limiter = max(norm / (state["scaling_grad"] + 1e-8), gamma) / gamma
    state["scaling_grad"] = norm / limiter
    return residual / limiter


def growth_limits(state: dict, norms: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """Fira's norm-growth limiter for several matrices at once (their norms one tensor, `state["scaling_grad"]` one
    per matrix): the divisor of each residual, or None on the first step (unlimited)."""
    if "scaling_grad" not in state:
        state["scaling_grad"] = norms
        return None
    limits = torch.clamp(norms / (state["scaling_grad"] + 1e-8), min=gamma) / gamma
    state["scaling_grad"] = norms / limits
    return limits


# -- settings -------------------------------------------------------------------------------------------
def check_projected_group(group: dict) -> None:
    """One-line errors for a projected group's settings."""
    missing = [k for k in PROJECTED_KEYS if k not in group]
    if missing:
        raise ValueError(f"projected param group lacks {', '.join(missing)}")
    if group["rank"] <= 0 or group["update_gap"] <= 0:
        raise ValueError(f"galore rank and update gap must be > 0, got {group['rank']} and {group['update_gap']}")
    if group["proj"] not in PROJECTIONS or group["residual"] not in RESIDUALS:
        raise ValueError(f"galore projection must be one of {PROJECTIONS} and the residual one of {RESIDUALS}")
    if group["limiter"] < 1.0:
        raise ValueError(f"fira limiter must be >= 1, got {group['limiter']}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"projected AdamW projects matrices, got a {p.dim()}-D parameter of shape {tuple(p.shape)}")
