"""Access classes shared by the engines that shard parameters or master copies (DeepSpeed ZeRO, FSDP2).

- `ShardedAccess`: ranks hold disjoint pieces; collectives run on the engine's device (NCCL needs CUDA
  tensors even for CPU-offloaded masters and CPU-side quantile histograms).
- `FlatRangeShards`: every rank holds one contiguous flat range of each tensor (ZeRO-3 `ds_tensor`
  slices, FSDP2 row shards). A merge of the local range of W needs all of A but only the rows of B under
  that range: one all_to_all brings exactly those, W is never gathered.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.distributed as dist
from torch import nn

from ..merge import delta_rows
from .base import ShardAccess


class ShardedAccess(ShardAccess):
    """Ranks hold disjoint pieces of the same tensors."""

    def __init__(self, group, comm_device):
        self.group = group
        self.comm_device = torch.device(comm_device)
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1

    def all_reduce_sum_(self, tensor):
        if self.world > 1:
            work = tensor.to(self.comm_device)
            dist.all_reduce(work, group=self.group)
            if work is not tensor:
                tensor.copy_(work)


class FlatRangeShards(ShardedAccess):
    """Each rank holds elements [lo, hi) of every flattened tensor (possibly none)."""

    @abstractmethod
    def owned(self, param: nn.Parameter, rank: int) -> tuple[int, int]:
        """Flat range [lo, hi) of the whole tensor that `rank` holds (padding excluded)."""

    @abstractmethod
    def local_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's fp32 values (masters where they exist) of its range, flat, on the comm device."""

    def needed_b(self, layer: nn.Module, rank: int, whole: bool) -> tuple[int, int]:
        """Flat range of B that `rank`'s merge reads: the rows under its range of W (ROW_BLOCK-aligned, see
        `lora_delta`), or all of B where `whole` (some rank merges a full copy of W)."""
        out_features, in_features = self.full_shape(layer.weight)
        r = self.full_shape(layer.lora_B)[1]
        if whole:
            return 0, out_features * r
        start, end = self.owned(layer.weight, rank)
        row0, row1 = delta_rows(start, end - start, in_features, out_features)
        return row0 * r, row1 * r

    def _segments(self, layers, whole, source: int, dest: int) -> list[tuple[nn.Parameter, int, int]]:
        """(param, lo, hi) flat ranges `source` holds and `dest` needs: every A, and B under dest's W range."""
        out = []
        for layer, w in zip(layers, whole):
            numel_A = self.full_shape(layer.lora_A).numel()
            for param, (lo, hi) in ((layer.lora_A, (0, numel_A)), (layer.lora_B, self.needed_b(layer, dest, w))):
                own_lo, own_hi = self.owned(param, source)
                lo, hi = max(lo, own_lo), min(hi, own_hi)
                if hi > lo:
                    out.append((param, lo, hi))
        return out

    def exchange_factors(self, layers, whole: list[bool]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """`lora_factors` through one all_to_all: each rank sends its range of every A, and of B where another
        rank's W range needs it; then one tiny all-reduce so every rank refuses a non-finite merge alike."""
        local = {id(p): self.local_fp32(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
        send_parts, send_sizes, recv_plan, recv_sizes = [], [], [], []
        for other in range(self.world):
            outgoing = [] if other == self.rank else self._segments(layers, whole, self.rank, other)
            incoming = [] if other == self.rank else self._segments(layers, whole, other, self.rank)
            for param, lo, hi in outgoing:
                own_lo = self.owned(param, self.rank)[0]
                send_parts.append(local[id(param)][lo - own_lo : hi - own_lo])
            send_sizes.append(sum(hi - lo for _, lo, hi in outgoing))
            recv_plan.append(incoming)
            recv_sizes.append(sum(hi - lo for _, lo, hi in incoming))
        device = self.comm_device
        received = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)
        if self.world > 1:
            send = torch.cat(send_parts) if send_parts else torch.zeros(0, device=device)
            dist.all_to_all_single(received, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=self.group)

        wanted = {}
        for layer, w in zip(layers, whole):
            wanted[id(layer.lora_A)] = (0, self.full_shape(layer.lora_A).numel())
            wanted[id(layer.lora_B)] = self.needed_b(layer, self.rank, w)
        assembled = {key: torch.full((hi - lo,), float("nan"), device=device) for key, (lo, hi) in wanted.items()}
        for param, lo, hi in self._segments(layers, whole, self.rank, self.rank):  # what this rank holds itself
            own_lo, base = self.owned(param, self.rank)[0], wanted[id(param)][0]
            assembled[id(param)][lo - base : hi - base] = local[id(param)][lo - own_lo : hi - own_lo]
        offset = 0
        for incoming in recv_plan:
            for param, lo, hi in incoming:
                base = wanted[id(param)][0]
                assembled[id(param)][lo - base : hi - base] = received[offset : offset + hi - lo]
                offset += hi - lo

        # Ranks hold different rows of B: agree on finiteness so every rank refuses a bad merge alike.
        bad = torch.tensor([float(not (assembled[id(l.lora_A)].isfinite().all() and assembled[id(l.lora_B)].isfinite().all()))
                            for l in layers])
        self.all_reduce_sum_(bad)
        factors = []
        for layer, flag in zip(layers, bad.tolist()):
            A32 = assembled[id(layer.lora_A)].view(self.full_shape(layer.lora_A))
            r = self.full_shape(layer.lora_B)[1]
            b_lo = wanted[id(layer.lora_B)][0]
            factors.append((A32.fill_(float("nan")) if flag else A32, assembled[id(layer.lora_B)].view(-1, r), b_lo // r))
        return factors

    def lora_factors(self, layers):
        return self.exchange_factors(layers, [False] * len(layers))

    def full_fp32(self, params):
        """Whole fp32 values in one all_gather of the (padded) local ranges."""
        sizes = [max(hi - lo for lo, hi in (self.owned(p, r) for r in range(self.world))) for p in params]
        local = torch.zeros(sum(sizes), dtype=torch.float32, device=self.comm_device)
        offset = 0
        for p, size in zip(params, sizes):
            lo, hi = self.owned(p, self.rank)
            local[offset : offset + hi - lo] = self.local_fp32(p)[: hi - lo]
            offset += size
        gathered = torch.empty(self.world * local.numel(), dtype=torch.float32, device=self.comm_device)
        if self.world > 1:
            dist.all_gather_into_tensor(gathered, local, group=self.group)
        else:
            gathered.copy_(local)
        per_rank = gathered.view(self.world, -1)
        out, offset = [], 0
        for p, size in zip(params, sizes):
            full = torch.empty(self.full_shape(p).numel(), dtype=torch.float32, device=self.comm_device)
            for r in range(self.world):
                lo, hi = self.owned(p, r)
                full[lo:hi] = per_rank[r, offset : offset + hi - lo]
            out.append(full.view(self.full_shape(p)))
            offset += size
        return out
