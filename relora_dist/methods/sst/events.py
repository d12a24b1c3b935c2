"""SST's work between updates, written once on the neutral access layer (no engine named):

- `project` (after every update): sigma clamped at 0, the active columns of U and V back to unit length. The column
  norms come from each rank's share of the factors (`TensorAccess.reduction_share`) and one all-reduce of the sums of
  squares of every layer's columns. Each holder is scaled in its own precision: fp32 masters exactly; a bf16 copy
  that an engine replicates (ZeRO-1/2's parameters, ZeRO-3's persistent ones) from its own bf16 value, the same on
  every rank, until the engine's next step rewrites it from the masters.
- `resample` (every iteration, T3 updates): the active copies written back into their columns of U and V, r new
  components drawn from the full sigma (the same draw on every rank), their columns loaded into the active copies,
  and the active copies' Adam moments zeroed (their step counters go on, as ReLoRA's reset; the LR restarts instead).
  Every rank fetches the rows of U, V and the active copies that its pieces cover (one `fetch_fp32`: nothing moves
  where the shards of U and U_active hold the same rows, as FSDP2's row shards do).
- `redecompose` (every round, T2 iterations): each layer's U, V, sigma and active copies fetched whole to one owner
  (layer i to rank i mod world), U diag(sigma) V^T decomposed again in fp32 there (`layer.decompose`: one sign
  convention), and the result sent to every rank (one all-reduce per layer in which only the owner's values are
  non-zero), which writes its pieces; the moments of sigma and the active copies zeroed. The only time U or V is
  gathered outside a forward.
"""

from __future__ import annotations

import torch

from ...access import TensorAccess, write_pieces
from .layer import SSTLinear, decompose, sample_components, with_active

MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_moments(access: TensorAccess, params) -> None:
    for param in params:
        for key in MOMENTS:
            for piece in access.state_pieces(param, key):
                for view in piece.views:
                    view.zero_()


def column_sums_of_squares(start: int, values: torch.Tensor, width: int) -> torch.Tensor:
    """Per column of a row-major matrix `width` wide: the sum of squares of the flat elements [start, start + n) given
    in `values` (a partial first row, whole rows summed at once, a partial last row: the same order on every call)."""
    out = torch.zeros(width, dtype=torch.float32, device=values.device)
    squares, n, offset, done = values.float().square(), values.numel(), start % width, 0
    if offset:
        done = min(width - offset, n)
        out[offset : offset + done] += squares[:done]
    rows = (n - done) // width
    if rows:
        out += squares[done : done + rows * width].view(rows, width).sum(0)
        done += rows * width
    if done < n:
        out[: n - done] += squares[done:]
    return out


@torch.no_grad()
def project(layers: list[SSTLinear], access: TensorAccess) -> None:
    """After an update: sigma >= 0 and unit active columns, every layer, one all-reduce (see the module docstring)."""
    factors = [p for layer in layers for p in (layer.U_active, layer.V_active)]
    widths = [access.full_shape(p)[1] for p in factors]
    device = layers[0].sigma.device if layers else torch.device("cpu")
    sums = torch.zeros(sum(widths), dtype=torch.float32, device=device)
    offset = 0
    for param, width in zip(factors, widths):
        for start, values in access.reduction_share(param):
            sums[offset : offset + width] += column_sums_of_squares(start, values, width).to(device)
        offset += width
    access.all_reduce_sum_(sums)
    norms = sums.sqrt().clamp(min=torch.finfo(torch.float32).tiny)
    offset = 0
    for param, width in zip(factors, widths):
        for piece in access.param_pieces(param):
            column = (torch.arange(piece.numel, device=device) + piece.start) % width
            for view in piece.views:  # each holder in its own precision (see the module docstring)
                view.copy_(view.float() / norms[offset : offset + width][column].to(view.device))
        offset += width
    for layer in layers:
        for piece in access.param_pieces(layer.sigma):
            for view in piece.views:
                view.clamp_(min=0)
    access.after_write(factors + [layer.sigma for layer in layers])


def _rows(lo: int, hi: int, width: int) -> tuple[int, int] | None:
    """The rows a flat span [lo, hi) of a matrix `width` wide touches (None: empty)."""
    return (lo // width, -(-hi // width)) if hi > lo else None


@torch.no_grad()
def resample(layers: list[SSTLinear], access: TensorAccess, generator: torch.Generator, rule: str) -> None:
    """A new sample of active components for every layer (see the module docstring): the function unchanged bit for
    bit."""
    sigmas = access.full_fp32([layer.sigma for layer in layers])
    chosen = [sample_components(sigma, layer.rank, generator, rule).to(layer.active.device)
              for layer, sigma in zip(layers, sigmas)]
    pairs = [(layer, frozen, copy) for layer in layers for frozen, copy in ((layer.U, layer.U_active), (layer.V, layer.V_active))]
    spans = access.spans([p for _, frozen, copy in pairs for p in (frozen, copy)])
    wanted, bands = [[] for _ in range(access.world)], []
    for index, (layer, frozen, copy) in enumerate(pairs):
        k, r = access.full_shape(frozen)[1], layer.rank
        for rank in range(access.world):
            spans_of = (_rows(*spans[2 * index][rank], k), _rows(*spans[2 * index + 1][rank], r))
            held = [s for s in spans_of if s is not None]
            band = (min(s[0] for s in held), max(s[1] for s in held)) if held else None
            if band is not None:
                wanted[rank] += [(frozen, band[0] * k, band[1] * k), (copy, band[0] * r, band[1] * r)]
            if rank == access.rank:
                bands.append(band)
    fetched = iter(access.fetch_fp32(wanted))
    for (layer, frozen, copy), band, new in zip(pairs, bands, [c for c in chosen for _ in range(2)]):
        if band is None:
            continue
        k, r = access.full_shape(frozen)[1], layer.rank
        basis = next(fetched).view(-1, k)
        written_back = with_active(basis, next(fetched).view(-1, r), layer.active.to(basis.device))
        loaded = written_back[:, new.to(basis.device)]
        for param, values, width in ((frozen, written_back, k), (copy, loaded, r)):
            write_pieces(access.param_pieces(param), values.reshape(-1), start=band[0] * width)
    for layer, new in zip(layers, chosen):
        layer.active.copy_(new)
    _zero_moments(access, [p for layer in layers for p in (layer.U_active, layer.V_active)])
    access.after_write([p for _, frozen, copy in pairs for p in (frozen, copy)])


@torch.no_grad()
def redecompose(layers: list[SSTLinear], access: TensorAccess) -> None:
    """Every layer's re-SVD on its owner, the result on every rank (see the module docstring)."""
    def parts(layer):
        return (layer.U, layer.V, layer.sigma, layer.U_active, layer.V_active)

    owner = [index % access.world for index in range(len(layers))]
    wanted = [[(p, 0, access.full_shape(p).numel()) for index, layer in enumerate(layers) if owner[index] == rank
               for p in parts(layer)] for rank in range(access.world)]
    fetched = iter(access.fetch_fp32(wanted))
    for index, layer in enumerate(layers):
        shapes = [access.full_shape(p) for p in parts(layer)]
        if owner[index] == access.rank:
            u, v, sigma, u_active, v_active = (next(fetched).view(shape) for shape in shapes)
            active = layer.active.to(u.device)
            weight = (with_active(u, u_active, active) * sigma) @ with_active(v, v_active, active).T
            new_u, new_sigma, new_v = decompose(weight)
            packed = torch.cat([new_u.reshape(-1), new_v.reshape(-1), new_sigma, new_u[:, active].reshape(-1),
                                new_v[:, active].reshape(-1)])
        else:
            packed = torch.zeros(sum(shape.numel() for shape in shapes), dtype=torch.float32, device=layer.active.device)
        access.all_reduce_sum_(packed)  # only the owner's values are non-zero: a broadcast, exact
        for param, values in zip(parts(layer), packed.split([shape.numel() for shape in shapes])):
            write_pieces(access.param_pieces(param), values)
    _zero_moments(access, [p for layer in layers for p in (layer.sigma, layer.U_active, layer.V_active)])
    access.after_write([p for layer in layers for p in parts(layer)])
