"""SwitchLoRA's switch between updates (asfsdsf/SwitchLoRA `switch_lora.py`), written once on the neutral access layer.

Before update t (0-based within the low-rank phase), per layer, in layer order:

    k       = floor(r / interval_t) + Bernoulli(frac(r / interval_t)),  interval_t = interval / rate(t),
              rate(t) = max(0.3 ** ((t + 1) / descent_steps), 1e-8)          (the dedicated generator; one draw a layer)
    k       = min(k, available)   available = min((pA - #frozen A rows - pB) mod r, (pB - #frozen B cols - pA) mod r)
    rows    = pA .. pA+k-1 (mod r);  slots d = the pool slots after the previous row's (continuous), or drawn
    W      += s · B[:, rows] @ (A[rows] - C_A[d]);  C_A[selected_A[rows]] = A[rows];  A[rows] = C_A[d] (as read before)
    B's columns pB .. pB+k-1 likewise (W^T += s · A^T[:, cols] @ (B^T[cols] - C_B[d']));  pA, pB advance by k
    a switched A row freezes B's column of the same index for `freeze_steps` updates, and the other way round;
    the frozen vector's exp_avg, exp_avg_sq and step are zeroed.

The official code switches after the backward of update t and zeroes the frozen vectors' gradients; here the
switch runs before the forward of update t and the freeze is a forward mask (`switch_layer.SwitchLoRALinear`),
which is the same update (the switch preserves the function, and a row of A's gradient does not depend on that
row) except that a gradient-norm clip sees the frozen vectors' gradients as zero: a stated deviation. Every layer's
switch is planned first (pointers, slots, freezes: replicated control state, the same draws on every rank), then one
`fetch_fp32` brings what all of them read (each layer's B, its switched rows of A and the pool slots taken), and the
writes go into every holder of this rank's pieces: no engine is named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...access import TensorAccess, add_in_fp32
from .layer import SwitchLoRALinear

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq", "vector_step")  # the per-element state a switch zeroes


@dataclass(frozen=True)
class SwitchSchedule:
    """How many vectors a layer switches before update t (the official `_get_switch_replace_num`)."""

    interval: float
    """Switch every `interval` updates per vector at the start (r / interval vectors an update)."""
    descent_steps: float
    """The rate falls to 0.3 of its start over this many updates (the official descent_rate * total steps)."""
    freeze_steps: int
    continuous: bool = True

    def rate(self, t: int) -> float:
        return max((0.3 ** (1.0 / self.descent_steps)) ** (t + 1), 1e-8)

    def count(self, rank: int, t: int, generator: torch.Generator) -> int:
        expected = rank / (self.interval / self.rate(t))
        fraction = expected - int(expected)
        return int(expected) + (1 if torch.rand((), generator=generator).item() < fraction else 0)


def available(layer: SwitchLoRALinear) -> int:
    """Vectors each side may switch now without reaching a frozen or just-switched index (official formula)."""
    r = layer.rank
    pa, pb = layer.pointers.tolist()
    frozen_a, frozen_b = int((layer.freeze_A > 0).sum()), int((layer.freeze_B > 0).sum())
    return min((pa - frozen_a - pb) % r, (pb - frozen_b - pa) % r)


@dataclass
class _Plan:
    """One layer's switch, decided before any tensor moves: which A rows and B columns, the slots they take and leave."""

    layer: SwitchLoRALinear
    rows: list[int]
    cols: list[int]
    slots_a: list[int]
    slots_b: list[int]
    parked_a: list[int]
    parked_b: list[int]
    batched_a: bool
    batched_b: bool


@torch.no_grad()
def switch(layers: list[SwitchLoRALinear], access: TensorAccess, t: int, schedule: SwitchSchedule,
           generator: torch.Generator, *, updates_done: int = 1) -> int:
    """The switch before update t of every layer (see the module docstring); `updates_done` (0 or 1) updates since
    the last switch first count down the freezes. One `fetch_fp32` for all layers. Returns the vectors switched."""
    for layer in layers:
        if updates_done:
            layer.freeze_A.sub_(updates_done).clamp_(min=0)
            layer.freeze_B.sub_(updates_done).clamp_(min=0)
    plans = []
    for layer in layers:
        if layer.pool_size <= layer.rank:  # nothing to switch to (the official code draws nothing either)
            continue
        k = min(schedule.count(layer.rank, t, generator), available(layer))
        if k > 0:
            plans.append(_plan(layer, k, schedule, generator))
    _apply(plans, access, schedule)
    return sum(2 * len(plan.rows) for plan in plans)


def _switch_layer(layer: SwitchLoRALinear, k: int, access: TensorAccess, schedule: SwitchSchedule,
                  generator: torch.Generator) -> None:
    """A switch of k vectors a side of one layer (no count draw, no thaw)."""
    _apply([_plan(layer, k, schedule, generator)], access, schedule)


def _plan(layer: SwitchLoRALinear, k: int, schedule: SwitchSchedule, generator: torch.Generator) -> _Plan:
    """Advance the pointers, pick the slots (A's first, then B's, as the official code draws them) and update the
    replicated control state; the tensors move in `_apply`."""
    r, c = layer.rank, layer.pool_size
    pa, pb = layer.pointers.tolist()
    rows = [(pa + j) % r for j in range(k)]
    cols = [(pb + j) % r for j in range(k)]
    layer.pointers.copy_(torch.tensor([(pa + k) % r, (pb + k) % r]))
    slots_a = _destinations(layer.selected_A, rows, c, generator, schedule.continuous)
    parked_a = layer.selected_A[rows].tolist()
    layer.selected_A[rows] = torch.tensor(slots_a)
    layer.freeze_B[rows] = schedule.freeze_steps  # a switched A row freezes B's column
    slots_b = _destinations(layer.selected_B, cols, c, generator, schedule.continuous)
    parked_b = layer.selected_B[cols].tolist()
    layer.selected_B[cols] = torch.tensor(slots_b)
    layer.freeze_A[cols] = schedule.freeze_steps
    return _Plan(layer, rows, cols, slots_a, slots_b, parked_a, parked_b,
                 _batched(rows, slots_a, schedule), _batched(cols, slots_b, schedule))


def _apply(plans: list[_Plan], access: TensorAccess, schedule: SwitchSchedule) -> None:
    """Read what every planned switch needs in one fetch, then fold, park and load layer by layer."""
    wanted = []
    for plan in plans:
        layer = plan.layer
        n, m, r = layer.in_features, layer.out_features, layer.rank
        wanted += [(layer.lora_B, 0, m * r)]
        wanted += [(layer.lora_A, i * n, (i + 1) * n) for i in plan.rows + plan.cols]
        wanted += [(layer.candidates_A, i * n, (i + 1) * n) for i in plan.slots_a]
        wanted += [(layer.candidates_B, i * m, (i + 1) * m) for i in plan.slots_b]
    fetched = iter(access.fetch_fp32([wanted] * access.world) if wanted else [])
    for plan in plans:
        layer = plan.layer
        k = len(plan.rows)
        B = next(fetched).view(layer.out_features, layer.rank)
        a_rows = torch.stack([next(fetched) for _ in range(2 * k)])
        old_a, new_a = a_rows[:k], torch.stack([next(fetched) for _ in range(k)])
        new_b = torch.stack([next(fetched) for _ in range(k)])

        # A's rows: fold s·B[:, rows] @ (A[rows] - C_A[d]) into W, park A[rows], load C_A[d].
        _fold(access, layer, B[:, plan.rows], old_a - new_a, batched=plan.batched_a, transpose=False)
        _write_rows(access, layer.candidates_A, plan.parked_a, old_a)
        _write_rows(access, layer.lora_A, plan.rows, new_a)

        # B's columns, with A as it is now: W^T += s·A^T[:, cols] @ (B^T[cols] - C_B[d']).
        a_cols = a_rows[k:].clone()
        for j, col in enumerate(plan.cols):
            if col in plan.rows:
                a_cols[j] = new_a[plan.rows.index(col)]
        old_b = B[:, plan.cols].T.contiguous()
        _fold(access, layer, a_cols.T, old_b - new_b, batched=plan.batched_b, transpose=True)
        _write_rows(access, layer.candidates_B, plan.parked_b, old_b)
        _write_columns(access, layer.lora_B, plan.cols, new_b.T)

        # The frozen counterparts restart their Adam state (moments and bias correction).
        frozen_rows = (layer.freeze_A == schedule.freeze_steps).nonzero().flatten().tolist()
        frozen_cols = (layer.freeze_B == schedule.freeze_steps).nonzero().flatten().tolist()
        for key in OPTIMIZER_KEYS:
            _write_elements(access.state_pieces(layer.lora_A, key), _row_index(frozen_rows, layer.in_features), 0.0)
            _write_elements(access.state_pieces(layer.lora_B, key), _column_index(frozen_cols, layer.out_features,
                                                                                  layer.rank), 0.0)
        access.after_write([layer.weight, layer.lora_A, layer.lora_B, layer.candidates_A, layer.candidates_B])


def _destinations(selected: torch.Tensor, indices: list[int], pool: int, generator: torch.Generator,
                  continuous: bool) -> list[int]:
    """Pool slots the switched vectors take: the slots after the previous vector's slot (continuous, the official
    default), or drawn without replacement among the slots no vector holds (discontinuous; the official code also
    offers the slots being vacated, which can load a vector it has just parked without folding it into W: excluded
    here so that every switch preserves the function)."""
    if continuous:
        start = int(selected[(indices[0] - 1) % len(selected)]) + 1
        return [(start + j) % pool for j in range(len(indices))]
    free = sorted(set(range(pool)) - set(selected.tolist()))
    weights = torch.ones(len(free))  # the official candidate weights stay uniform unless rank estimation changes them
    picked = torch.multinomial(weights, len(indices), replacement=False, generator=generator)
    return [free[i] for i in picked.tolist()]


def _batched(indices: list[int], slots: list[int], schedule: SwitchSchedule) -> bool:
    """The official code folds a consecutive block (indices and slots both consecutive, no wrap) with one GEMM and
    anything else vector by vector (rank-1 updates in turn): the same rounding here."""
    consecutive = lambda xs: all(b == a + 1 for a, b in zip(xs, xs[1:]))  # noqa: E731
    return schedule.continuous and len(indices) > 1 and consecutive(indices) and consecutive(slots)


def _fold(access: TensorAccess, layer: SwitchLoRALinear, left: torch.Tensor, right: torch.Tensor, *, batched: bool,
          transpose: bool) -> None:
    """W += s·left @ right (transpose: W^T += s·left @ right), one GEMM or one rank-1 update per vector."""
    terms = [left @ right] if batched else [left[:, j : j + 1] @ right[j : j + 1] for j in range(right.shape[0])]
    for term in terms:
        delta = term * layer.scale
        delta = (delta.T if transpose else delta).reshape(-1)
        for piece in access.param_pieces(layer.weight):
            for view in piece.views:
                add_in_fp32(view, delta[piece.start : piece.start + piece.numel])


def _row_index(rows: list[int], width: int) -> torch.Tensor:
    return (torch.tensor(rows, dtype=torch.long).unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def _column_index(cols: list[int], height: int, width: int) -> torch.Tensor:
    return (torch.arange(height).unsqueeze(1) * width + torch.tensor(cols, dtype=torch.long)).reshape(-1)


def _write_rows(access: TensorAccess, param, rows: list[int], values: torch.Tensor) -> None:
    _write_elements(access.param_pieces(param), _row_index(rows, access.full_shape(param)[1]), values.reshape(-1))


def _write_columns(access: TensorAccess, param, cols: list[int], values: torch.Tensor) -> None:
    height, width = access.full_shape(param)
    _write_elements(access.param_pieces(param), _column_index(cols, height, width), values.reshape(-1))


def _write_elements(pieces, index: torch.Tensor, values) -> None:
    """Elements `index` of a full flat tensor set to `values` (a tensor in index order, or a number) in every holder."""
    for piece in pieces:
        inside = (index >= piece.start) & (index < piece.start + piece.numel)
        if not bool(inside.any()):
            continue
        local = index[inside] - piece.start
        for view in piece.views:
            source = values[inside] if torch.is_tensor(values) else values
            view.view(-1)[local.to(view.device)] = source.to(view.device, view.dtype) if torch.is_tensor(source) else source
