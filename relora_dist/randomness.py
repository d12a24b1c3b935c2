"""Dedicated, shard-invariant random streams for re-init and random pruning.

Every rank draws the *full* tensor from a CPU generator keyed by (seed, restart, tensor name, purpose)
and keeps its own flat slice, so results never depend on world size, sharding, iteration order or
on how much the global/CUDA RNG was consumed (the reference code's replica drift, SPEC section 7).
"""

from __future__ import annotations

import hashlib
import math

import torch


def keyed_generator(seed: int, restart_index: int, name: str, purpose: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}|{restart_index}|{name}|{purpose}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def kaiming_uniform_A(shape: tuple[int, int], *, seed: int, restart_index: int, name: str) -> torch.Tensor:
    """Full fp32 A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), on CPU."""
    bound = 1.0 / math.sqrt(shape[1])
    g = keyed_generator(seed, restart_index, name, "lora_A")
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)


def keep_mask(numel: int, ratio: float, *, seed: int, restart_index: int, name: str, key: str) -> torch.Tensor:
    """Flat bool mask over the full tensor that zeroes each entry with probability `ratio`."""
    g = keyed_generator(seed, restart_index, name, f"prune/{key}")
    return torch.rand(numel, generator=g) >= ratio
