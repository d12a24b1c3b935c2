"""Exact per-tensor quantiles of non-negative values split across ranks (radix select on fp32 bits).

For non-negative fp32 the int32 bit pattern is monotone, so the k-th smallest value is found one byte at
a time: 4 rounds, each one all-reduce of a [queries, 256] histogram. Works for any size (torch.quantile
refuses more than 2^24 elements) and matches torch.quantile's linear interpolation bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch

_TORCH_QUANTILE_MAX = 1 << 24


def _bits(pieces: list[torch.Tensor]) -> torch.Tensor:
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    flat = torch.cat([p.detach().reshape(-1).float().abs().cpu() for p in pieces])
    return flat.view(torch.int32).to(torch.int64)


def kth_smallest(
    items: list[list[torch.Tensor]], ranks: list[list[int]], all_reduce_sum_: Callable[[torch.Tensor], None],
    sizes: list[int] | None = None,
) -> list[list[float]]:
    """For each item (its local pieces) the values of |x| at the given 0-based global ranks.

    Every rank passes the same items and ranks (items may be locally empty); 4 all-reduces in total.
    """
    bits = [_bits(pieces) for pieces in items]
    queries = [(i, k) for i, ks in enumerate(ranks) for k in ks]
    prefix = torch.zeros(len(queries), dtype=torch.int64)
    remaining = torch.tensor([k for _, k in queries], dtype=torch.int64)
    # int32 counts halve the bytes on the wire when the global sizes (same on every rank) allow it.
    count_dtype = torch.int32 if sizes is not None and max(sizes, default=0) < 2**31 else torch.int64
    for byte in (3, 2, 1, 0):
        hist = torch.zeros(len(queries), 256, dtype=count_dtype)
        shift = 8 * byte
        for q, (i, _) in enumerate(queries):
            b = bits[i]
            if byte < 3:
                b = b[(b >> (shift + 8)) == (prefix[q] >> (shift + 8))]
            hist[q] = torch.bincount((b >> shift) & 0xFF, minlength=256).to(count_dtype)
        all_reduce_sum_(hist)
        cumulative = hist.to(torch.int64).cumsum(dim=1)
        chosen = (cumulative <= remaining.unsqueeze(1)).sum(dim=1)  # first bin whose cumsum exceeds k
        below = torch.where(chosen > 0, cumulative.gather(1, (chosen - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        remaining -= below
        prefix |= chosen << shift
    values = prefix.to(torch.int32).view(torch.float32).tolist()
    out, it = [], iter(values)
    for ks in ranks:
        out.append([next(it) for _ in ks])
    return out


def quantile_positions(n: int, q: float) -> tuple[int, int, float]:
    """(lower rank, upper rank, weight) exactly as torch.quantile computes them (fp32 arithmetic)."""
    if n <= _TORCH_QUANTILE_MAX:
        pos = (torch.tensor(q, dtype=torch.float32) * (n - 1)).item()
    else:  # beyond what torch.quantile accepts, fp32 cannot address every rank
        pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + (1 if pos > lo else 0), n - 1)
    return lo, hi, float(torch.tensor(pos, dtype=torch.float32 if n <= _TORCH_QUANTILE_MAX else torch.float64) - lo)


def abs_quantiles(
    items: list[list[torch.Tensor]], sizes: list[int], q: float, all_reduce_sum_: Callable[[torch.Tensor], None]
) -> list[float]:
    """quantile(|x|, q) with linear interpolation for each item of global size `sizes[i]`."""
    positions = [quantile_positions(n, q) for n in sizes]
    values = kth_smallest(items, [[lo, hi] for lo, hi, _ in positions], all_reduce_sum_, sizes)
    out = []
    for (lo_v, hi_v), (_, _, w) in zip(values, positions):
        lo_t, hi_t = torch.tensor(lo_v, dtype=torch.float32), torch.tensor(hi_v, dtype=torch.float32)
        out.append(torch.lerp(lo_t, hi_t, torch.tensor(w, dtype=torch.float32)).item())
    return out
