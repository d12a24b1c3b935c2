"""Whole rows of the matrices inside flat optimizer partitions (DeepSpeed ZeRO-1/2/3, BF16_Optimizer).

A partition holds a flat range [lo, hi) of each row-major (m x n) matrix: whole rows, plus at most a partial row at
each end that a partition boundary cuts. A rank works on its rows padded with zeros to whole rows:
- a right projection works row by row (R_row = G_row P^T): a cut row's R is the sum of the partial products of the
  ranks that share it, after which every sharing rank holds the row's moments (r each);
- a left projection contracts the rows (R = P^T G = the sum over rows of P_row^T G_row): where several ranks hold
  rows of a matrix, its R (r x n) is the sum of their partial products P_rows^T G_rows, after which every such rank
  holds the matrix's moments (r x n); a matrix one rank holds whole needs nothing.
All the sums of a flat tensor go in one all-reduce per step, then each rank updates its own elements. Nothing else
is exchanged per step; a refresh gathers each matrix to one owner (`owner_collectives.py`).

`FlatPartitionStepper` is that step, and the per-matrix records that carry its state to another partitioning. The
optimizer (`optimizer.ProjectedAdamW`) builds one in `locate_partitions` and hands it the state and settings of each
flat tensor; the math per matrix is `matrix_math.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...ranges import assemble_ranges
from .matrix_math import adam_moments, fira_scaling, growth_limits, projects_left, step_size
from .owner_collectives import broadcast_from_owners, gather_to_owners, refresh_owner

# compute_projector(whole fp32 gradient, rank, left, previous P or None) -> P (`matrix_math.svd_projector`'s contract)
Projector = Callable[[torch.Tensor, int, bool, torch.Tensor | None], torch.Tensor]


@dataclass
class MatrixSlice:
    """This rank's elements [lo, hi) of matrix `index` (m x n), at `offset` in the flat tensor (None: holds none)."""

    index: int
    m: int
    n: int
    lo: int
    hi: int
    offset: int | None

    @classmethod
    def of(cls, index: int, partition, rank: int) -> "MatrixSlice":
        m, n = partition.shape
        lo, hi = partition.ranges[rank]
        return cls(index, m, n, lo, hi, partition.offset)

    @property
    def holds(self) -> bool:
        return self.hi > self.lo

    @property
    def rows(self) -> int:
        return self.row1 - self.row0

    @property
    def row0(self) -> int:
        return self.lo // self.n if self.holds else 0

    @property
    def row1(self) -> int:
        return -(-self.hi // self.n) if self.holds else 0

    def values(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements of the matrix inside `flat` (a view)."""
        return flat.narrow(0, self.offset, self.hi - self.lo)

    def padded(self, flat: torch.Tensor) -> torch.Tensor:
        """The rows this rank touches, (row1 - row0) x n, zero where another rank holds the elements."""
        rows = flat.new_zeros(self.row1 - self.row0, self.n)
        self.local(rows).copy_(self.values(flat))
        return rows

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a (row1 - row0) x n tensor over its rows, flat."""
        start = self.lo - self.row0 * self.n
        return rows.reshape(-1).narrow(0, start, self.hi - self.lo)


def cut_rows(partitions, lefts: list[bool]) -> list[tuple[int, int]]:
    """(matrix index, row) of every row a partition boundary cuts in a right-projected matrix, sorted: the same list
    on every rank."""
    rows = set()
    for index, (partition, left) in enumerate(zip(partitions, lefts)):
        if left:
            continue
        m, n = partition.shape
        for lo, hi in partition.ranges:
            for bound in (lo, hi):
                if lo < hi and 0 < bound < m * n and bound % n:
                    rows.add((index, bound // n))
    return sorted(rows)


def shared_left(partitions, lefts: list[bool]) -> list[int]:
    """Index of every left-projected matrix that more than one rank holds elements of: the same list on every rank."""
    return [index for index, (partition, left) in enumerate(zip(partitions, lefts))
            if left and sum(hi > lo for lo, hi in partition.ranges) > 1]


class FlatPartitionStepper:
    """The projected step on flat partitions (either projection, per matrix) for the flat tensors in `partitions`
    (id of a flat tensor -> its `access.FlatPartition`s, the same order on every rank), spread over process group
    `group`; `compute_projector` computes each refreshed P (the optimizer's, which counts them).

    The state of a flat tensor, a dict the caller keeps: `step`; `exp_avg`, `exp_avg_sq` matrix after matrix, of a
    right-projected one over the rows this rank touches ((row1 - row0) x r, cut rows on every rank sharing them), of
    a left-projected one whole (r x n) on every rank holding elements of it; `projector`, every matrix's P (r x n
    right, m x r left) back to back; Fira's `scaling_grad`, one per matrix."""

    def __init__(self, partitions: dict[int, list], group, compute_projector: Projector):
        self.partitions = partitions
        self.group = group
        self.compute_projector = compute_projector

    @property
    def state_reshardable(self) -> bool:
        """False when some flat tensor is stepped here: its state is per partition (`portable_state` carries it)."""
        return not self.partitions

    def steps(self, flat: torch.Tensor) -> bool:
        """Whether `flat` is one of the flat tensors this stepper steps."""
        return id(flat) in self.partitions

    def _slices(self, group: dict, partitions: list) -> tuple[list[MatrixSlice], list[int], list[bool]]:
        """This rank's slice of each matrix of a flat tensor, each matrix's rank r and whether it projects left."""
        slices = [MatrixSlice.of(i, part, dist.get_rank(self.group)) for i, part in enumerate(partitions)]
        return (slices, [min(group["rank"], s.m, s.n) for s in slices],
                [projects_left(group["proj"], s.m, s.n) for s in slices])

    def flat_tensors(self, param_groups: list[dict]) -> Iterator[tuple[dict, torch.Tensor, list]]:
        """(group, flat tensor, its partitions) of every projected group in `param_groups` stepped here."""
        for group in param_groups:
            for flat in group["params"] if "rank" in group else ():
                if id(flat) in self.partitions:
                    yield group, flat, self.partitions[id(flat)]

    # -- the state without the partitioning (resume on another number of ranks) ---------------------------------
    def portable_state(self, states: Mapping, param_groups: list[dict]) -> dict:
        """Per projected matrix this rank touches, keyed by its model parameter: the rows [row0, row0 + len) of its
        moments held here, P, the step and Fira's limiter norm, from `states` (the optimizer's state per flat
        tensor). The records of all ranks, whatever their number, are what `load_portable_state` rebuilds the state
        from on any partitioning."""
        out = {}
        for group, flat, partitions in self.flat_tensors(param_groups):
            state = states[flat]
            if "step" not in state:
                continue
            slices, ranks, lefts = self._slices(group, partitions)
            moments, projectors = _moments(state, slices, ranks, lefts), _projectors(state, slices, ranks, lefts)
            for s, part, (exp_avg, exp_avg_sq), projector, left in zip(slices, partitions, moments, projectors, lefts):
                if not s.holds:
                    continue
                record = {"step": state["step"].clone(), "row0": 0 if left else s.row0, "exp_avg": exp_avg.clone(),
                          "exp_avg_sq": exp_avg_sq.clone(), "projector": projector.clone(),
                          "projection_left": torch.tensor(left)}
                if "scaling_grad" in state:
                    record["scaling_grad"] = state["scaling_grad"][s.index].clone()
                out[part.param] = record
        return out

    def load_portable_state(self, states: MutableMapping, param_groups: list[dict], records: list[dict]) -> list[torch.Tensor]:
        """Replace the state in `states` of every projected flat tensor by one rebuilt from `portable_state`'s records
        of every saved rank (dicts keyed by model parameter); cut rows appear in several records, with equal values.
        Returns the flat tensors whose state was replaced."""
        replaced = []
        for group, flat, partitions in self.flat_tensors(param_groups):
            slices, ranks, lefts = self._slices(group, partitions)
            found = [[r[part.param] for r in records if part.param in r] for part in partitions]
            if not any(found):
                continue
            missing = [i for i, pieces in enumerate(found) if not pieces]
            if missing:
                raise ValueError(f"checkpoint has no optimizer state for {len(missing)} of the {len(partitions)} projected"
                                 f" matrices of a group (written with another method or rank?)")
            state, moments, scaling = {"step": found[0][0]["step"].clone()}, ([], []), []
            projectors = []
            for s, r, left, pieces in zip(slices, ranks, lefts, found):
                projector = pieces[0]["projector"]
                expected = (s.m, r) if left else (r, s.n)
                if tuple(projector.shape) != expected or bool(pieces[0].get("projection_left", False)) != left:
                    raise ValueError(f"checkpoint's projector has shape {tuple(projector.shape)}, this run's rank and"
                                     f" projection need {expected}: resume with the --rank and --galore-proj it was"
                                     f" written with")
                for kept, key in zip(moments, ("exp_avg", "exp_avg_sq")):
                    if left:  # whole on every rank holding elements of the matrix
                        kept.append(pieces[0][key].reshape(-1) if s.holds else pieces[0][key].new_zeros(0))
                    else:
                        kept.append(_assemble_rows(pieces, key, s.m, r)[s.row0 : s.row1].reshape(-1))
                projectors.append(projector.reshape(-1))
                if "scaling_grad" in pieces[0]:
                    scaling.append(pieces[0]["scaling_grad"])
            device = flat.device
            state["exp_avg"], state["exp_avg_sq"] = (torch.cat(kept).to(device) for kept in moments)
            state["projector"] = torch.cat(projectors).to(device)
            state["projection_left"] = torch.tensor(lefts)
            if scaling:
                state["scaling_grad"] = torch.stack(scaling).to(device)
            states[flat] = state
            replaced.append(flat)
        return replaced

    # -- the step -------------------------------------------------------------------------------------------------
    def step(self, state: dict, group: dict, flat: torch.Tensor) -> None:
        """One update of flat tensor `flat` (its gradient in `flat.grad`) with the settings of its param group
        `group`; `state` is its optimizer state, updated in place."""
        pg = self.group
        partitions = self.partitions[id(flat)]
        slices, ranks, lefts = self._slices(group, partitions)
        size = sum(_moment_shape(s, r, left).numel() for s, r, left in zip(slices, ranks, lefts))
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"], state["exp_avg_sq"] = flat.new_zeros(size), flat.new_zeros(size)
            state["projector"] = flat.new_zeros(sum(r * (s.m if left else s.n) for s, r, left in zip(slices, ranks, lefts)))
            state["projection_left"] = torch.tensor(lefts)
        elif state["exp_avg"].numel() != size or _sides(state, len(lefts)) != lefts:
            raise ValueError("the optimizer state was written with another GaLore rank or projection side: resume with"
                             " the --rank and --galore-proj it was written with")
        projectors = _projectors(state, slices, ranks, lefts)
        if int(state["step"]) % group["update_gap"] == 0:
            self._refresh(group, flat.grad, partitions, slices, projectors, lefts, first=int(state["step"]) == 0)
        grads = [s.padded(flat.grad) if s.holds else None for s in slices]
        # a left P cut to the rows this rank touches: R's partial product and back(X) for those rows
        row_projectors = [p[s.row0 : s.row1] if left else p for s, p, left in zip(slices, projectors, lefts)]
        projected = [None if g is None else p.T @ g if left else g @ p.T
                     for g, p, left in zip(grads, row_projectors, lefts)]
        self._sum_shared(partitions, slices, projected, ranks, lefts, flat.device)
        state["step"] += 1
        size = step_size(group, state["step"])
        moments = _moments(state, slices, ranks, lefts)
        fira = group["residual"] == "fira"
        updates, residuals = [], []
        for s, (exp_avg, exp_avg_sq), g, low, p, left in zip(slices, moments, grads, projected, row_projectors, lefts):
            if not s.holds:
                updates.append(None)
                residuals.append(None)
                continue
            normalized = adam_moments(exp_avg, exp_avg_sq, low, group)
            updates.append(s.local(_back(p, normalized, left) * group["scale"]))
            residuals.append(s.local((g - _back(p, low, left) * group["scale"]) * fira_scaling(normalized, low, left))
                             if fira else None)
        if fira:
            self._limit(state, residuals, group, pg, flat.device)
        for s, update, residual in zip(slices, updates, residuals):
            if update is None:
                continue
            values = s.values(flat.data)
            values.add_(update if residual is None else update + residual, alpha=-size)
            if group["weight_decay"] > 0.0:
                values.add_(values, alpha=-group["lr"] * group["weight_decay"])

    def _sum_shared(self, partitions, slices, projected, ranks, lefts, device) -> None:
        """R where several ranks hold parts of it is the sum of their partial products: a right-projected matrix's cut
        rows (r each), a left-projected matrix's whole R (r x n), all in one all-reduce."""
        # (matrix, cut row) or (matrix, None: its whole R) of every summed piece, the same list on every rank
        summed = cut_rows(partitions, lefts) + [(i, None) for i in shared_left(partitions, lefts)]
        if not summed:
            return
        widths = [ranks[i] * (slices[i].n if row is None else 1) for i, row in summed]
        buffer = torch.zeros(sum(widths), device=device)
        targets = []  # this rank's part of R under each piece, or None where it holds none of it
        for (i, row), piece in zip(summed, buffer.split(widths)):
            s = slices[i]
            if row is None:
                target = projected[i] if s.holds else None
            else:
                target = projected[i][row - s.row0] if s.holds and s.row0 <= row < s.row1 else None
            if target is not None:
                piece.copy_(target.reshape(-1))
            targets.append((target, piece))
        dist.all_reduce(buffer, group=self.group)
        for target, piece in targets:
            if target is not None:
                target.copy_(piece.view_as(target))

    @staticmethod
    def _limit(state: dict, residuals: list, group: dict, pg, device) -> None:
        """Fira's limiter with every matrix's |S|_F summed over the ranks (one all-reduce), residuals scaled in place."""
        squares = torch.zeros(len(residuals), device=device)
        for i, residual in enumerate(residuals):
            if residual is not None:
                squares[i] = (residual * residual).sum()
        dist.all_reduce(squares, group=pg)
        limits = growth_limits(state, squares.sqrt(), group["limiter"])
        if limits is None:  # the first step is unlimited
            return
        for residual, limit in zip(residuals, limits):
            if residual is not None:
                residual.div_(limit)

    def _refresh(self, group, grad, partitions, slices, projectors, lefts, *, first: bool) -> None:
        """Each matrix's P computed by the rank holding most of it (ties in turn): from its own elements when it holds
        the whole matrix (ZeRO-1/2 mostly), else from the pieces gathered to it; then broadcast."""
        pg = self.group
        me = dist.get_rank(pg)
        owners = [refresh_owner(part, i) for i, part in enumerate(partitions)]
        pieces = []
        for part, s in zip(partitions, slices):
            width = max(hi - lo for lo, hi in part.ranges)
            piece = None if width == s.m * s.n else grad.new_zeros(width)  # held whole by its owner: nothing to send
            if piece is not None and s.holds:
                piece[: s.hi - s.lo] = s.values(grad)
            pieces.append(piece)
        received = gather_to_owners(pieces, owners, pg)
        for i, (part, s, piece, receive) in enumerate(zip(partitions, slices, pieces, received)):
            if owners[i] != me:
                continue
            if piece is None:
                full = s.values(grad)
            else:
                full = grad.new_zeros(s.m * s.n)
                for (lo, hi), values in zip(part.ranges, receive):
                    full[lo:hi] = values[: hi - lo]
            previous = None if first else projectors[i].clone()
            projectors[i].copy_(self.compute_projector(full.view(s.m, s.n).float(), group["rank"], lefts[i], previous))
        broadcast_from_owners(projectors, owners, pg)


def _sides(state: dict, count: int) -> list[bool]:
    """Which matrices the state projects from the left (a state written before it recorded them: none)."""
    return [bool(x) for x in state["projection_left"].tolist()] if "projection_left" in state else [False] * count


def _back(projector: torch.Tensor, low: torch.Tensor, left: bool) -> torch.Tensor:
    """back(X): P X (left, P cut to the rows this rank touches) or X P (right)."""
    return projector @ low if left else low @ projector


def _moment_shape(s: MatrixSlice, r: int, left: bool) -> torch.Size:
    """This rank's moments of a matrix: (row1 - row0) x r of a right projection, r x n of a left one it holds."""
    if left:
        return torch.Size((r, s.n) if s.holds else (0, s.n))
    return torch.Size((s.rows, r))


def _moments(state: dict, slices: list[MatrixSlice], ranks: list[int],
             lefts: list[bool]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each matrix's (exp_avg, exp_avg_sq) as this rank keeps them (`_moment_shape`), views into the state."""
    shapes = [_moment_shape(s, r, left) for s, r, left in zip(slices, ranks, lefts)]
    sizes = [shape.numel() for shape in shapes]
    return [(m.view(shape), v.view(shape))
            for m, v, shape in zip(state["exp_avg"].split(sizes), state["exp_avg_sq"].split(sizes), shapes)]


def _projectors(state: dict, slices: list[MatrixSlice], ranks: list[int], lefts: list[bool]) -> list[torch.Tensor]:
    """Each matrix's P (r x n right, m x r left), views into the state."""
    shapes = [(s.m, r) if left else (r, s.n) for s, r, left in zip(slices, ranks, lefts)]
    return [p.view(shape) for p, shape in zip(state["projector"].split([a * b for a, b in shapes]), shapes)]


def _assemble_rows(pieces: list[dict], key: str, m: int, r: int) -> torch.Tensor:
    """The whole (m x r) moment `key` of one matrix from the row ranges several ranks saved."""
    for piece in pieces:
        if piece[key].shape[1] != r:
            raise ValueError(f"checkpoint's optimizer moments have rank {piece[key].shape[1]}, this run's is {r}: resume"
                             f" with the rank it was written with")
    return assemble_ranges(((piece["row0"], piece[key]) for piece in pieces), m, what=f"optimizer state ({key} rows of a matrix)")

