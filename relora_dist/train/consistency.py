"""Replica check (invariant I3): replicated tensors must be bit-identical on every rank."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def _digest(tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")  # fits int64


def replica_mismatches(named_tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> list[str]:
    """Names whose bytes differ between ranks. Collective: every rank passes the same names in order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not named_tensors:
        return []
    digests = torch.tensor([_digest(t) for _, t in named_tensors], dtype=torch.int64, device=device)
    low, high = digests.clone(), digests.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return [name for (name, _), lo, hi in zip(named_tensors, low.tolist(), high.tolist()) if lo != hi]


def check_replicas(named_tensors: list[tuple[str, torch.Tensor]], device: torch.device, what: str) -> None:
    bad = replica_mismatches(named_tensors, device)
    if bad:
        raise RuntimeError(f"replicas diverged after {what}: {len(bad)} tensors differ across ranks, e.g. {bad[:3]}")
