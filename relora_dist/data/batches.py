"""Which sequences go into each global batch, and how a batch is split across ranks.

The sample content of global batch b depends only on (num_sequences, global_batch_size,
seed, b), never on world size or the micro-batch/accumulation split, so a 2-rank run sees
exactly the same data per optimizer step as a 1-rank run with the same global batch.
"""

from __future__ import annotations

import torch


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
            self._cached_perm = torch.randperm(self.num_sequences, generator=gen)
            self._cached_epoch = epoch
        return self._cached_perm

    def global_indices(self, batch_index: int) -> torch.Tensor:
        """The G sequence indices (int64) of global batch `batch_index`, in order."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].clone()

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
    val: torch.Tensor, *, rank: int, world_size: int, batch_size: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """This rank's validation token batches: sequences r, r+W, r+2W, ... in chunks of batch_size.

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
        val = val[: max_batches * batch_size]
    return list(val[rank::world_size].split(batch_size))
