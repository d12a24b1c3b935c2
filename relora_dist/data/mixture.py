"""Mixtures of stores: `--dataset a=0.7,b=0.3` and the deterministic interleave of their sequences.

Position t of the run's sequence stream (t = batch * global_batch_size + slot) is given to a store by sequential
Sainte-Lague (Webster) apportionment, the same deterministic, low-discrepancy interleave Megatron's blended
datasets approximate with their greedy error rule: store j's k-th sequence has the key (2k+1)/(2 w_j), and the
stream takes the keys in increasing order (ties to the store named first). After T positions every store has
floor(w_j T) or ceil(w_j T) of them, within one, and how many any store has after T positions is a closed
form (`counts_before`), so a run resumes at any batch without replaying the ones before.
Weights are exact fractions (the decimal given, normalised), and the keys are compared in integers: every rank
and every machine computes the same interleave.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Component:
    spec: str  # a store path, or a source prepared into a store on first use
    weight: Fraction


def parse_mixture(dataset: str | None) -> list[Component] | None:
    """`a=0.7,b=0.3` -> its components (weights normalised to sum 1); None for a single dataset. The weights are
    relative (`a=7,b=3` is the same mixture)."""
    if dataset is None or "=" not in dataset:
        return None
    components = []
    for part in dataset.split(","):
        spec, sep, weight = part.strip().rpartition("=")
        if not sep or not spec:
            raise ValueError(f"mixture component {part.strip()!r} is not STORE=WEIGHT (--dataset a=0.7,b=0.3)")
        try:
            value = Fraction(weight.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"mixture weight of {spec} is not a number: {weight!r} (--dataset)") from None
        if value <= 0:
            raise ValueError(f"mixture weight of {spec} must be > 0, got {weight.strip()} (--dataset)")
        components.append(Component(spec.strip(), value))
    specs = [c.spec for c in components]
    if len(set(specs)) != len(specs):
        raise ValueError(f"mixture names a store twice: {', '.join(sorted(s for s in set(specs) if specs.count(s) > 1))}"
                         " (--dataset)")
    total = sum(c.weight for c in components)
    return [Component(c.spec, c.weight / total) for c in components]


class Interleave:
    """Which store each position of the sequence stream draws from, for weights `weights` (Fractions)."""

    def __init__(self, weights: list[Fraction]):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError("mixture weights must be positive")
        scale = math.lcm(*(w.denominator for w in weights))
        self.a = [int(w * scale) for w in weights]  # integer weights: key of (j, k) is (2k+1) / a_j

    def _before(self, i: int, k: int) -> int:
        """How many keys of all stores come before store i's k-th key (its position in the stream)."""
        p_num = 2 * k + 1
        position = k
        for j, a_j in enumerate(self.a):
            if j == i:
                continue
            # keys (2m+1)/a_j before (2k+1)/a_i: (2m+1) a_i < p a_j, or equal and store j named first
            bound = p_num * a_j
            odd_max = bound // self.a[i] if j < i else (bound - 1) // self.a[i]
            position += (odd_max + 1) // 2
        return position

    def counts_before(self, t: int) -> list[int]:
        """Sequences each store has given to positions 0..t-1."""
        counts = []
        for i in range(len(self.a)):
            lo, hi = 0, t + 1  # the number of store i's keys at positions < t: smallest k with position >= t
            while lo < hi:
                mid = (lo + hi) // 2
                if self._before(i, mid) < t:
                    lo = mid + 1
                else:
                    hi = mid
            counts.append(lo)
        return counts

    def draws(self, start: int, count: int) -> list[tuple[int, int]]:
        """(store, that store's draw index) of positions start .. start+count-1."""
        counts = self.counts_before(start)
        heap = [(_Key(2 * k + 1, a), j, k) for j, (k, a) in enumerate(zip(counts, self.a))]
        heapq.heapify(heap)
        out = []
        for _ in range(count):
            key, j, k = heapq.heappop(heap)
            out.append((j, k))
            heapq.heappush(heap, (_Key(2 * k + 3, self.a[j]), j, k + 1))
        return out


class _Key:
    """The rational (num / den), compared exactly; equal keys fall to the heap's next field, the store index."""

    __slots__ = ("num", "den")

    def __init__(self, num: int, den: int):
        self.num, self.den = num, den

    def __lt__(self, other: "_Key") -> bool:
        return self.num * other.den < other.num * self.den

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.num * other.den == other.num * self.den
