"""One owner per matrix: the collectives of a projector refresh where ranks hold pieces of the matrices (FSDP2 row
shards, DeepSpeed's flat partitions). Each matrix's pieces are gathered to its owner, which computes P; P is then
broadcast from the owner to every rank. All matrices' collectives are issued at once and waited for together.

Who owns a matrix: in turn (`round_robin_owners`) where every rank holds about as much of each (FSDP2's row
chunks), else the rank holding most of it (`refresh_owner`, so ZeRO-1/2's whole matrices need no gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_rank(group, rank: int) -> int:
    """The global rank of `rank` in process group `group` (None: the default group), as gather and broadcast want it."""
    return rank if group is None else dist.get_global_rank(group, rank)


def round_robin_owners(count: int, world: int) -> list[int]:
    """Matrix i's owner is rank i % world (every rank lists the same matrices in the same order)."""
    return [i % world for i in range(count)]


def refresh_owner(partition, index: int) -> int:
    """The rank holding the most of a matrix (an `access.FlatPartition`, matrix `index` of its flat tensor); among
    equals (ZeRO-3's even slices) matrix after matrix in turn."""
    sizes = [hi - lo for lo, hi in partition.ranges]
    tied = [rank for rank, size in enumerate(sizes) if size == max(sizes)]
    return tied[index % len(tied)]


def gather_to_owners(pieces: list, owners: list[int], group) -> list:
    """Per matrix, this rank's piece (the same size on every rank) gathered to the matrix's owner: every rank's
    pieces on the owner, None elsewhere. A None piece is not sent (its owner holds the matrix whole)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    works, received = [], []
    for piece, owner in zip(pieces, owners):
        receive = [torch.empty_like(piece) for _ in range(world)] if piece is not None and me == owner else None
        if piece is not None:
            works.append(dist.gather(piece, receive, dst=global_rank(group, owner), group=group, async_op=True))
        received.append(receive)
    for work in works:
        work.wait()
    return received


def broadcast_from_owners(tensors: list[torch.Tensor], owners: list[int], group) -> None:
    """Each tensor, in place, from its owner to every rank."""
    works = [dist.broadcast(t, src=global_rank(group, owner), group=group, async_op=True) for t, owner in zip(tensors, owners)]
    for work in works:
        work.wait()
