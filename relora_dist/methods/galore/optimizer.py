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
- a DTensor sharded on dim 0 (FSDP2) holds rows: a right projection needs no per-step collective (R, the moments,
  phi and the update are row-local, the moments row shards); a left one contracts the rows, so each rank projects
  its rows (P_rows^T G_rows) and the r x n partial products of all such matrices are summed in one all-reduce per
  step, after which every rank holds R and keeps its moments (r x n, the same on every rank); a refresh gathers G
  to one owner per matrix (round robin), which computes P and broadcasts it; Fira's limiter sums |S|^2 over the
  ranks in one all-reduce per step for all matrices;
- a flat partition (DeepSpeed ZeRO-1/2/3) cuts across matrices: the engine calls `locate_partitions`, and a
  `flat_partition.FlatPartitionStepper` steps those tensors (whole rows; either projection).

P is fp32 with a fixed sign convention (each singular vector's largest-magnitude entry positive), so every rank
and every SVD routine agree on it; the direction is kept in the state (`projection_left`), never read from shapes.

Here: the optimizer, whole matrices and row shards. The math per matrix is `matrix_math.py` (re-exported here), the
owner-per-matrix collectives of a refresh `owner_collectives.py`, the flat partitions `flat_partition.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..closure import evaluate_closure
from .flat_partition import FlatPartitionStepper
from .matrix_math import (PROJECTED_KEYS, PROJECTIONS, RESIDUALS, adam_moments, check_projected_group, fira_scaling,
                          fix_signs, limit_residual, projects_left, random_orthonormal, step_size, svd_projector)
from .owner_collectives import broadcast_from_owners, gather_to_owners, round_robin_owners

__all__ = ["ProjectedAdamW", "PROJECTED_KEYS", "PROJECTIONS", "RESIDUALS", "adam_moments", "check_projected_group",
           "fira_scaling", "fix_signs", "random_orthonormal", "step_size"]


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


class ProjectedAdamW(torch.optim.Optimizer):
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
        self._flat: FlatPartitionStepper | None = None  # set by locate_partitions (DeepSpeed ZeRO-1/2/3)

    # -- the subspace --------------------------------------------------------------------------------
    def compute_projector(self, grad: torch.Tensor, rank: int, left: bool, previous: torch.Tensor | None) -> torch.Tensor:
        """P for the whole fp32 gradient `grad`: the top-`rank` left (m x r) or right (r x n) singular vectors. A
        non-finite gradient keeps `previous`, and a zero one too (a fixed random basis when there is none yet)."""
        self.refreshes += 1
        return svd_projector(grad, rank, left, previous)

    @staticmethod
    def _projects_left(group: dict, rows: _Rows) -> bool:
        return projects_left(group["proj"], *rows.shape)

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
        owners = round_robin_owners(len(sharded), world)
        pieces = []
        for rows in sharded:  # this rank's rows, padded to torch.chunk's row count
            piece = torch.zeros(-(-rows.shape[0] // world), rows.shape[1], dtype=torch.float32, device=rows.local.device)
            piece[: rows.grad.shape[0]] = rows.grad
            pieces.append(piece)
        projectors = []
        for rows, owner, receive in zip(sharded, owners, gather_to_owners(pieces, owners, pg)):
            state = self.state[rows.param]
            left = self._projects_left(group, rows)
            if owner == me:
                full = torch.cat(receive)[: rows.shape[0]]
                projectors.append(self.compute_projector(full, rank, left, state.get("projector")))
            else:
                (m, n), r = rows.shape, min(rank, *rows.shape)
                projectors.append(torch.empty((m, r) if left else (r, n), dtype=torch.float32, device=rows.local.device))
        broadcast_from_owners(projectors, owners, pg)
        for rows, projector in zip(sharded, projectors):
            self.state[rows.param]["projector"] = projector
            self.state[rows.param]["projection_left"] = torch.tensor(self._projects_left(group, rows))

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

    # -- flat partitions (`access.FlatPartitionOptimizer`): a FlatPartitionStepper does the work -------------------
    def locate_partitions(self, partitions: dict[int, list], group=None) -> None:
        """Engines whose optimizer steps flat partitions (DeepSpeed ZeRO-1/2/3) say which matrices each holds:
        id of a flat tensor -> its `access.FlatPartition`s, and the process group the partitions are spread over."""
        self._flat = FlatPartitionStepper(partitions, group, self.compute_projector)

    @property
    def state_reshardable(self) -> bool:
        """False when the state is laid out per flat partition: DeepSpeed's universal checkpoint cannot reshard it, so
        the engine saves `portable_state` beside it and rebuilds from that (`backends/deepspeed/portable_state.py`)."""
        return self._flat is None or self._flat.state_reshardable

    def portable_state(self) -> dict:
        """The flat partitions' state per projected matrix, keyed by model parameter (`FlatPartitionStepper`)."""
        return {} if self._flat is None else self._flat.portable_state(self.state, self.param_groups)

    def load_portable_state(self, records: list[dict]) -> list[torch.Tensor]:
        """The flat partitions' state rebuilt from every saved rank's `portable_state`; returns the flat tensors
        whose state was replaced."""
        return [] if self._flat is None else self._flat.load_portable_state(self.state, self.param_groups, records)

    def _step_projected(self, group: dict) -> None:
        params = group["params"]
        if self._flat is not None and len(params) == 1 and self._flat.steps(params[0]):
            if params[0].grad is not None:
                self._flat.step(self.state[params[0]], group, params[0])
            return
        if any(p.dim() != 2 for p in params):
            raise ValueError("projected AdamW got a flat partition but no layout: the engine must call locate_partitions")
        matrices = [_rows_of(p) for p in params if p.grad is not None]
        for rows in matrices:
            state = self.state[rows.param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
            elif "projection_left" in state and bool(state["projection_left"]) != self._projects_left(group, rows):
                raise ValueError(f"the optimizer state projects a {rows.shape[0]} x {rows.shape[1]} matrix from the"
                                 f" {'left' if bool(state['projection_left']) else 'right'}, this run's --galore-proj"
                                 f" {group['proj']} from the other side: resume with the --galore-proj it was written with")
        gap = group["update_gap"]
        self._refresh(group, [rows for rows in matrices if "projector" not in self.state[rows.param]
                              or int(self.state[rows.param]["step"]) % gap == 0])
        pending = []  # Fira on row shards: the limiter needs |S|_F over every rank's rows
        for rows, projected in zip(matrices, self._project(matrices)):
            update, residual, step_size = self._projected_update(group, rows, projected)
            if residual is not None and rows.sharded:
                pending.append((rows, update, residual, step_size))
                continue
            if residual is not None:
                update = update + limit_residual(self.state[rows.param], residual, torch.norm(residual), group["limiter"])
            rows.local.add_(update, alpha=-step_size)
            self._decay(rows.local, group)
        if pending:
            squares = torch.stack([(residual * residual).sum() for _, _, residual, _ in pending])
            dist.all_reduce(squares, group=pending[0][0].group)
            for (rows, update, residual, step_size), square in zip(pending, squares):
                update = update + limit_residual(self.state[rows.param], residual, square.sqrt(), group["limiter"])
                rows.local.add_(update, alpha=-step_size)
                self._decay(rows.local, group)

    def _row_projector(self, rows: _Rows) -> tuple[torch.Tensor, bool]:
        """(P, left), P cut to this rank's rows where it is left-projected (m x r) and row-sharded."""
        state = self.state[rows.param]
        projector, left = state["projector"], bool(state["projection_left"])
        if left and rows.sharded:
            projector = projector.narrow(0, rows.row0, rows.local.shape[0])
        return projector, left

    def _project(self, matrices: list[_Rows]) -> list[torch.Tensor]:
        """R of every matrix: G P^T or P^T G; a row-sharded left one's partial products (P_rows^T G_rows) summed over
        the ranks, all such matrices in one all-reduce."""
        out, partial = [], []
        for rows in matrices:
            projector, left = self._row_projector(rows)
            out.append(projector.T @ rows.grad if left else rows.grad @ projector.T)
            if left and rows.sharded:
                partial.append(len(out) - 1)
        if partial:
            bucket = torch.cat([out[i].reshape(-1) for i in partial])
            dist.all_reduce(bucket, group=matrices[partial[0]].group)
            for i, summed in zip(partial, bucket.split([out[i].numel() for i in partial])):
                out[i] = summed.view_as(out[i])
        return out

    def _projected_update(self, group: dict, rows: _Rows,
                          projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(alpha * back(N), Fira's unlimited residual S or None, the step size) of this rank's rows, whose R is
        `projected`."""
        state = self.state[rows.param]
        projector, left = self._row_projector(rows)
        grad = rows.grad
        if rows.sharded and not left and "exp_avg" not in state:  # moments as row shards, so checkpoints reshard them
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
