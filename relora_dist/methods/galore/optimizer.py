"""GaLore's gradient-projection AdamW (Zhao et al. 2024) with Fira's norm-scaled full-rank residual (Chen et al.
2024) as one switch, on whole matrices and on FSDP2's row shards.

The update of a projected matrix W (m x n) with gradient G, at the optimizer's own step t (counted per matrix
from 0, read before it is incremented), as the official code (jiaweizzhao/GaLore `adamw.py`, xichen-fy/Fira
`fira_adamw.py`) does it:

    if t % T == 0: P = top-r singular vectors of G      right: Vh[:r] (r x n)   left: U[:, :r] (m x r)
    R = G P^T (right) | P^T G (left)                     the moments live at R's shape: r * max(m, n)
    m, v = HF-style Adam moments of R;  N = m / (sqrt(v) + eps);  step size lr * sqrt(1 - b2^t) / (1 - b1^t)
    update = alpha * back(N)                             back(X) = X P (right) | P X (left)
    Fira:  phi = |N| / (|R| + 1e-8) per row (right) or column (left);  S = (G - alpha * back(R)) * phi
           S /= max(|S|_F / (s_prev + 1e-8), gamma) / gamma (from the second step);  s_prev = |S|_F;  update += S
    W -= step size * update;  W -= lr * wd * W

Groups without a `rank` key take the same HF-style AdamW without projection (embeddings, norms, head).
Projected groups carry `rank`, `update_gap` (T), `scale` (alpha), `proj` (std | right | left), `residual`
(none | fira) and `limiter` (gamma).

Where a matrix lives decides who computes what:
- a plain tensor is the whole matrix (single process, DDP, ZeRO-0, the owner of an OSS / ZeroRedundancyOptimizer
  partition): everything is local, exactly the official step;
- a DTensor sharded on dim 0 (FSDP2) holds rows: right projection needs no per-step collective (R, the moments,
  phi and the update are row-local); a refresh gathers G to one owner per matrix (round robin), which computes P and
  broadcasts it; Fira's limiter sums |S|^2 over the ranks in one all-reduce per step for all matrices. Left
  projection would contract the sharded rows every step, so `std` projects such matrices from the right (a stated
  deviation; `left` is refused).

P is fp32 with a fixed sign convention (each singular vector's largest-magnitude entry positive), so every rank
and every SVD routine agree on it; the direction is kept in the state (`projection_left`), never read from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..closure import evaluate_closure
from .flat_partition import FlatPartitionSteps, broadcast_from_owners, gather_to_owners

PROJECTIONS = ("std", "right", "left")
RESIDUALS = ("none", "fira")
PROJECTED_KEYS = ("rank", "update_gap", "scale", "proj", "residual", "limiter")


@dataclass
class _Rows:
    """This rank's rows [row0, row0 + local.shape[0]) of one projected matrix of shape `shape`."""

    param: torch.Tensor
    local: torch.Tensor
    grad: torch.Tensor
    shape: tuple[int, int]
    row0: int
    group: object  # the process group sharing the rows, None when this rank holds the matrix whole
    mesh: object

    @property
    def sharded(self) -> bool:
        return self.group is not None


def _rows_of(param: torch.Tensor) -> _Rows:
    if not isinstance(param, DTensor):
        return _Rows(param, param.data, param.grad, tuple(param.shape), 0, None, None)
    if tuple(param.placements) != (Shard(0),) or param.dim() != 2:
        raise ValueError(f"projected AdamW needs whole matrices or row shards (Shard(0) on a 1-D mesh), got"
                         f" {param.placements} of a {param.dim()}-D parameter")
    mesh = param.device_mesh
    rows, chunk = param.shape[0], -(-param.shape[0] // mesh.size())  # torch.chunk's rows, as FSDP2 shards
    grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
    return _Rows(param, param.to_local(), grad, tuple(param.shape), min(mesh.get_local_rank() * chunk, rows),
                 mesh.get_group(), mesh)


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


class ProjectedAdamW(FlatPartitionSteps, torch.optim.Optimizer):
    """GaLore / Fira AdamW; see the module docstring. `eps` is added to sqrt(v) before bias correction, and weight
    decay acts after the update, as in the official (HF-style) AdamW both methods ship."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            if "rank" in group:
                check_projected_group(group)
        self.refreshes = 0
        """Projectors computed so far on this rank (SVDs run here)."""

    # -- the subspace --------------------------------------------------------------------------------
    def compute_projector(self, grad: torch.Tensor, rank: int, left: bool, previous: torch.Tensor | None) -> torch.Tensor:
        """P for the whole fp32 gradient `grad`: the top-`rank` left (m x r) or right (r x n) singular vectors. A
        non-finite gradient keeps `previous`, and a zero one too (a fixed random basis when there is none yet)."""
        self.refreshes += 1
        r = min(rank, *grad.shape)
        finite = bool(torch.isfinite(grad).all())
        if not finite or not bool(grad.any()):
            if previous is not None:
                return previous
            basis = random_orthonormal(r, grad.shape[0] if left else grad.shape[1])
            return basis.T.contiguous() if left else basis
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return fix_signs(u[:, :r], dim=0).contiguous() if left else fix_signs(vh[:r], dim=1).contiguous()

    def _projects_left(self, group: dict, rows: _Rows) -> bool:
        m, n = rows.shape
        if group["proj"] == "left":
            if rows.sharded:
                raise ValueError("--galore-proj left contracts the rows FSDP2 shards every step: use std or right")
            return True
        return group["proj"] == "std" and m < n and not rows.sharded

    def _refresh(self, group: dict, due: list[_Rows]) -> None:
        """New projectors for the matrices in `due` (whole ones locally; sharded ones by an owner, broadcast)."""
        rank = group["rank"]
        sharded = [rows for rows in due if rows.sharded]
        for rows in due:
            if not rows.sharded:
                state = self.state[rows.param]
                left = self._projects_left(group, rows)
                state["projector"] = self.compute_projector(rows.grad.float(), rank, left, state.get("projector"))
                state["projection_left"] = torch.tensor(left)
        if not sharded:
            return
        pg = sharded[0].group
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        owners = [i % world for i in range(len(sharded))]  # every rank lists the same matrices in the same order
        pieces = []
        for rows in sharded:  # this rank's rows, padded to torch.chunk's row count
            piece = torch.zeros(-(-rows.shape[0] // world), rows.shape[1], dtype=torch.float32, device=rows.local.device)
            piece[: rows.grad.shape[0]] = rows.grad
            pieces.append(piece)
        projectors = []
        for rows, owner, receive in zip(sharded, owners, gather_to_owners(pieces, owners, pg)):
            state = self.state[rows.param]
            if owner == me:
                full = torch.cat(receive)[: rows.shape[0]]
                projectors.append(self.compute_projector(full, rank, False, state.get("projector")))
            else:
                r = min(rank, *rows.shape)
                projectors.append(torch.empty(r, rows.shape[1], dtype=torch.float32, device=rows.local.device))
        broadcast_from_owners(projectors, owners, pg)
        for rows, projector in zip(sharded, projectors):
            self.state[rows.param]["projector"] = projector
            self.state[rows.param]["projection_left"] = torch.tensor(False)

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            if "rank" in group:
                self._step_projected(group)
            else:
                self._step_dense(group)
        return loss

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Update the moments with `grad` (projected or not); returns (m / (sqrt(v) + eps), the step size)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if isinstance(exp_avg, DTensor) and not isinstance(grad, DTensor):  # row-sharded moments of local rows
            exp_avg, exp_avg_sq = exp_avg.to_local(), exp_avg_sq.to_local()
        state["step"] += 1
        return adam_moments(exp_avg, exp_avg_sq, grad, group), step_size(group, state["step"])

    @staticmethod
    def _decay(param: torch.Tensor, group: dict) -> None:
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])

    def _step_dense(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
            normalized, step_size = self._adam(state, p.grad, group)
            p.add_(normalized, alpha=-step_size)
            self._decay(p, group)

    def locate_partitions(self, partitions: dict[int, list], group=None) -> None:
        """Engines whose optimizer steps flat partitions (DeepSpeed ZeRO-1/2/3) say which matrices each holds:
        id of a flat tensor -> its `access.FlatPartition`s, and the process group the partitions are spread over."""
        self._partitions, self._partition_group = partitions, group

    @property
    def state_reshardable(self) -> bool:
        """False when the state is laid out per flat partition: DeepSpeed's universal checkpoint cannot reshard it, so
        the engine saves `portable_state` beside it and rebuilds from that (`backends/deepspeed_portable.py`)."""
        return not getattr(self, "_partitions", None)

    def _step_projected(self, group: dict) -> None:
        params = group["params"]
        partitions = getattr(self, "_partitions", None) or {}
        if len(params) == 1 and id(params[0]) in partitions:
            if params[0].grad is not None:
                self._step_flat(group, params[0], partitions[id(params[0])])
            return
        if any(p.dim() != 2 for p in params):
            raise ValueError("projected AdamW got a flat partition but no layout: the engine must call locate_partitions")
        matrices = [_rows_of(p) for p in params if p.grad is not None]
        for rows in matrices:
            if "step" not in self.state[rows.param]:
                self.state[rows.param]["step"] = torch.tensor(0.0)
        gap = group["update_gap"]
        self._refresh(group, [rows for rows in matrices if "projector" not in self.state[rows.param]
                              or int(self.state[rows.param]["step"]) % gap == 0])
        pending = []  # Fira on row shards: the limiter needs |S|_F over every rank's rows
        for rows in matrices:
            update, residual, step_size = self._projected_update(group, rows)
            if residual is not None and rows.sharded:
                pending.append((rows, update, residual, step_size))
                continue
            if residual is not None:
                update = update + self._limit(self.state[rows.param], residual, torch.norm(residual), group)
            rows.local.add_(update, alpha=-step_size)
            self._decay(rows.local, group)
        if pending:
            squares = torch.stack([(residual * residual).sum() for _, _, residual, _ in pending])
            dist.all_reduce(squares, group=pending[0][0].group)
            for (rows, update, residual, step_size), square in zip(pending, squares):
                update = update + self._limit(self.state[rows.param], residual, square.sqrt(), group)
                rows.local.add_(update, alpha=-step_size)
                self._decay(rows.local, group)

    def _projected_update(self, group: dict, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(alpha * back(N), Fira's unlimited residual S or None, the step size) of this rank's rows."""
        state = self.state[rows.param]
        projector, left = state["projector"], bool(state["projection_left"])
        grad = rows.grad
        projected = projector.T @ grad if left else grad @ projector.T
        if rows.sharded and "exp_avg" not in state:  # moments as row shards, so checkpoints reshard them
            local = torch.zeros_like(projected)
            shape = (rows.shape[0], projected.shape[1])
            state["exp_avg"], state["exp_avg_sq"] = (
                DTensor.from_local(local.clone(), rows.mesh, [Shard(0)], run_check=False, shape=shape,
                                   stride=(shape[1], 1)) for _ in range(2))
        normalized, step_size = self._adam(state, projected, group)
        back = (lambda x: projector @ x) if left else (lambda x: x @ projector)
        update = back(normalized) * group["scale"]
        if group["residual"] != "fira":
            return update, None, step_size
        residual = (grad - back(projected) * group["scale"]) * fira_scaling(normalized, projected, left)
        return update, residual, step_size

    @staticmethod
    def _limit(state: dict, residual: torch.Tensor, norm: torch.Tensor, group: dict) -> torch.Tensor:
        """Fira's norm-growth limiter: |S| may grow by at most gamma per step (the first step is unlimited)."""
        gamma = group["limiter"]
        if "scaling_grad" not in state:
            state["scaling_grad"] = norm
            return residual
        limiter = max(norm / (state["scaling_grad"] + 1e-8), gamma) / gamma
        state["scaling_grad"] = norm / limiter
        return residual / limiter


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


def fira_scaling(normalized: torch.Tensor, projected: torch.Tensor, left: bool) -> torch.Tensor:
    """Fira's phi = |N| / (|R| + 1e-8) over the rank dimension: (1, n), one per column, for a left projection (r x n);
    (m, 1), one per row, for a right one (m x r)."""
    dim = 0 if left else 1
    phi = torch.norm(normalized, dim=dim) / (torch.norm(projected, dim=dim) + 1e-8)
    return phi.unsqueeze(0) if left else phi.unsqueeze(1)


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
