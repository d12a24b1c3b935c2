"""Process-group setup from the launcher's environment (torchrun, deepspeed, or none)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


SETUP_TIMEOUT = datetime.timedelta(hours=2)
_setup_group = None


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout, rank=rank, world_size=world_size)
        global _setup_group
        # Work that rank 0 does alone (training a tokenizer, packing a corpus, converting a checkpoint) can take
        # longer than a collective should ever wait: the other ranks wait for it on a group of its own.
        _setup_group = dist.new_group(backend="gloo", timeout=max(timeout, SETUP_TIMEOUT))
    # Groups created later without a timeout (DeepSpeed's data-parallel groups, device meshes) take torch's
    # module default (30 min gloo, 10 min NCCL), not the world group's: make that ours too.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed(*, synchronize: bool = True) -> None:
    """Leave the process group. After a clean run the ranks first meet at a barrier: a gloo rank that
    tears its group down while a peer is still finishing can leave the job hanging at exit (pytorch#75097).
    After an error, skip it: a peer may be gone."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn, *, rank: int, world_size: int):
    """Run `fn` on rank 0, then on the others (which then hit rank 0's caches).

    A failure on rank 0 is raised on every rank (a ValueError with the same message), so a bad input
    never leaves the other ranks waiting in a collective. The others wait up to SETUP_TIMEOUT (or the run's
    collective timeout, if longer), not the collective timeout: rank 0's work alone may take long.
    """
    if world_size == 1:
        return fn()
    if rank != 0:
        error = [None]
        dist.broadcast_object_list(error, src=0, group=_setup_group)
        if error[0] is not None:
            raise ValueError(error[0])
        return fn()
    try:
        result = fn()
    except Exception as e:
        dist.broadcast_object_list([str(e) if isinstance(e, ValueError) else f"rank 0 failed: {type(e).__name__}: {e}"],
                                   src=0, group=_setup_group)
        raise
    dist.broadcast_object_list([None], src=0, group=_setup_group)
    return result
