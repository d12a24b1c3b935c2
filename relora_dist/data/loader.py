"""This rank's micro-batches, update after update, read from the run's stores.

Without workers (the default on a CPU, where a read is microseconds against a step of seconds) the loop reads each
update's sequences itself. With workers (the default on a GPU) a `torch.utils.data.DataLoader` reads the next
updates in its worker processes and pins them, so reading overlaps the step and the copy to the GPU is
asynchronous. Either way update b holds exactly the sequences `SequenceSampler.local_microbatches(b)` names,
so the numbers do not depend on the loader; a resumed run starts it at the update it resumes from.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset

from .pipeline import RunData


class UpdateBatches(Dataset):
    """Item b: (b, this rank's micro-batches of update b), read from the stores."""

    def __init__(self, data: RunData, *, rank: int, world_size: int, micro_batch_size: int):
        self.data, self.rank, self.world_size, self.micro_batch_size = data, rank, world_size, micro_batch_size

    def __getitem__(self, batch_index: int) -> tuple[int, list[torch.Tensor]]:
        micro = self.data.sampler.local_microbatches(batch_index, rank=self.rank, world_size=self.world_size,
                                                     micro_batch_size=self.micro_batch_size)
        return batch_index, [self.data.read(pairs) for pairs in micro]


class _From:
    """Update indices start, start+1, ... (an endless sampler: the loop decides when to stop)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def default_workers(device: torch.device) -> int:
    return 2 if device.type == "cuda" else 0


class BatchLoader:
    """`next(loader)` -> (update index, this rank's micro-batches on `device`)."""

    def __init__(self, data: RunData, *, rank: int, world_size: int, micro_batch_size: int, device: torch.device,
                 start: int, workers: int | None = None):
        self.device = device
        self.workers = default_workers(device) if workers is None else workers
        batches = UpdateBatches(data, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
        if self.workers == 0:
            self._iter = (batches[b] for b in itertools.count(start))
            self._loader = None
        else:
            self._loader = DataLoader(batches, sampler=_From(start), batch_size=None, num_workers=self.workers,
                                      pin_memory=device.type == "cuda", prefetch_factor=2)
            self._iter = iter(self._loader)

    def __next__(self) -> tuple[int, list[torch.Tensor]]:
        index, micro = next(self._iter)
        return index, [m.to(self.device, non_blocking=True) for m in micro]

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the worker processes (their prefetched batches are dropped)."""
        self._iter = None
        self._loader = None
