"""Which sequences go into each global batch, and how a batch is split across ranks.

The sample content of global batch b depends only on (num_sequences, global_batch_size,
seed, b), never on world size or the micro-batch/accumulation split, so a 2-rank run sees
exactly the same data per optimizer step as a 1-rank run with the same global batch.
"""

from __future__ import annotations

import torch

from .mixture import Interleave


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def split_batch(global_batch_size: int, *, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches per rank per optimizer update; ValueError when the global batch does not split evenly."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if global_batch_size % world_size != 0:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by world size {world_size}")
    per_rank = global_batch_size // world_size
    if per_rank % micro_batch_size != 0:
        raise ValueError(
            f"per-rank batch {per_rank} (global batch {global_batch_size} / world size {world_size}) "
            f"is not divisible by micro batch size {micro_batch_size}"
        )
    return per_rank // micro_batch_size


class GlobalBatchPlan:
    """Epoch-wise shuffled global batches; batch indices count across epochs (0-based)."""

    def __init__(self, num_sequences: int, global_batch_size: int, seed: int, *, seq_len: int | None = None):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if num_sequences < global_batch_size:
            tokens = f" of {seq_len} tokens" if seq_len is not None else ""
            raise ValueError(
                f"too few tokens for one global batch: {num_sequences} sequences{tokens}, "
                f"global batch {global_batch_size}"
            )
        self.num_sequences = num_sequences
        self.global_batch_size = global_batch_size
        self.seed = seed
        # The remainder of each epoch is dropped so every batch has exactly G sequences.
        self.batches_per_epoch = num_sequences // global_batch_size
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # int32 halves a rank's memory for the plan (4 bytes a sequence); the same permutation as int64's.
            dtype = torch.int32 if self.num_sequences < 2**31 else torch.int64
            self._cached_perm = torch.randperm(self.num_sequences, generator=gen, dtype=dtype)
            self._cached_epoch = epoch
        return self._cached_perm

    def global_indices(self, batch_index: int) -> torch.Tensor:
        """The G sequence indices (int64) of global batch `batch_index`, in order."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].long()

    def draw(self, index: int) -> int:
        """The `index`-th sequence of the plan's stream (global batch b is draws b*G .. b*G+G-1)."""
        epoch, within = divmod(index, self.batches_per_epoch * self.global_batch_size)
        return int(self._permutation(epoch)[within])

    def local_microbatches(
        self, batch_index: int, *, rank: int, world_size: int, micro_batch_size: int
    ) -> list[torch.Tensor]:
        """Index tensors of this rank's micro-batches for global batch `batch_index`.

        Rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of the global indices and
        splits it into consecutive micro-batches; concatenating all ranks' micro-batches
        in rank order gives back `global_indices(batch_index)`.
        """
        _check_rank(rank, world_size)
        split_batch(self.global_batch_size, world_size=world_size, micro_batch_size=micro_batch_size)
        per_rank = self.global_batch_size // world_size
        local = self.global_indices(batch_index)[rank * per_rank : (rank + 1) * per_rank]
        return list(local.split(micro_batch_size))


def val_batches(
    num_sequences: int, *, rank: int, world_size: int, batch_size: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Index tensors of this rank's validation batches: sequences r, r+W, r+2W, ... of the first `num_sequences`,
    in chunks of batch_size.

    `max_batches` caps the evaluated set at the first `max_batches * batch_size` sequences in
    total (not per rank), so the set evaluated does not change with world size. Ranks may get
    different numbers of batches (possibly none); callers must all-reduce the sums of
    loss*tokens and of tokens across ranks and divide, not average per-rank means.
    """
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        num_sequences = min(num_sequences, max_batches * batch_size)
    return list(torch.arange(num_sequences)[rank::world_size].split(batch_size))


class SequenceSampler:
    """The (store, sequence) pairs of each global batch, over one store or a weighted mixture of several.

    One store: `GlobalBatchPlan`'s epoch-wise shuffle. Several: the positions of the run's sequence stream go to the
    stores by `mixture.Interleave`; store j's d-th draw is sequence `perm_j(e)[d mod U_j]` of its own epoch-wise
    shuffle (e = d div U_j, U_j its sequences rounded down to whole global batches), so every store cycles through
    its sequences epoch by epoch at its own pace. Like the single-store plan, it depends only on the sizes, the
    weights, the global batch size, the seed and the batch index: never on the world size.
    """

    def __init__(self, sizes: list[int], global_batch_size: int, seed: int, *, weights=None, names=None,
                 seq_len: int | None = None):
        names = names or [f"store {j}" for j in range(len(sizes))]
        for size, name in zip(sizes, names):
            if size < global_batch_size:
                tokens = f" of {seq_len} tokens" if seq_len is not None else ""
                where = f" in {name}" if len(sizes) > 1 else ""
                raise ValueError(f"too few tokens for one global batch{where}: {size} sequences{tokens}, "
                                 f"global batch {global_batch_size}")
        self.global_batch_size = global_batch_size
        # Store j shuffles with its own seed (the generator keeps only a seed's low 32 bits: the offset must move them).
        self.plans = [GlobalBatchPlan(size, global_batch_size, seed + 1_000_000_007 * j) for j, size in enumerate(sizes)]
        self.interleave = Interleave(list(weights)) if len(sizes) > 1 else None

    @property
    def num_stores(self) -> int:
        return len(self.plans)

    def global_batch(self, batch_index: int) -> list[tuple[int, int]]:
        """The G (store, sequence) pairs of global batch `batch_index`, in order."""
        if self.interleave is None:
            return [(0, int(i)) for i in self.plans[0].global_indices(batch_index)]
        G = self.global_batch_size
        return [(j, self.plans[j].draw(d)) for j, d in self.interleave.draws(batch_index * G, G)]

    def local_microbatches(self, batch_index: int, *, rank: int, world_size: int,
                           micro_batch_size: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches: rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of the global batch, split
        into consecutive micro-batches (as `GlobalBatchPlan.local_microbatches`)."""
        _check_rank(rank, world_size)
        split_batch(self.global_batch_size, world_size=world_size, micro_batch_size=micro_batch_size)
        per_rank = self.global_batch_size // world_size
        local = self.global_batch(batch_index)[rank * per_rank: (rank + 1) * per_rank]
        return [local[i: i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

    def shares(self, batch_index: int) -> list[int]:
        """Sequences of global batch `batch_index` from each store."""
        counts = [0] * self.num_stores
        if self.interleave is None:
            counts[0] = self.global_batch_size
            return counts
        G = self.global_batch_size
        before, after = self.interleave.counts_before(batch_index * G), self.interleave.counts_before((batch_index + 1) * G)
        return [b - a for a, b in zip(before, after)]
