"""Count the collectives (and their bytes) a piece of code issues, engines' own calls included.

DeepSpeed's `deepspeed.comm`, FSDP2 and our backends all end in `torch.distributed.<collective>`, mostly looked
up at call time, so wrapping those attributes for the duration of a `with` block sees every call (plus the two
functions DeepSpeed's backend captured at start, wrapped where it keeps them).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# name -> index of the argument whose size is the payload (the output buffer for gathers).
_PAYLOAD_ARG = {
    "all_reduce": 0, "broadcast": 0, "reduce": 0, "gather": 0, "all_gather": 0, "all_gather_into_tensor": 0,
    "reduce_scatter": 0, "reduce_scatter_tensor": 0, "all_to_all_single": 0, "all_to_all": 0,
    "_all_gather_base": 0, "_reduce_scatter_base": 0, "all_gather_coalesced": 0, "all_reduce_coalesced": 0,
    "send": 0, "recv": 0, "isend": 0, "irecv": 0,
    "all_gather_single": 0, "reduce_scatter_single": 0,  # torch >= 2.13's names (FSDP2 calls these)
}
# Gathers are counted by what each rank receives, reduce-scatters by what each rank sends.
_FULL_SIZE_ARG = {"all_gather_into_tensor": 0, "_all_gather_base": 0, "all_gather_single": 0,
                  "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "reduce_scatter_single": 1}


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


@dataclass
class Collective:
    op: str
    bytes: int


@dataclass
class CollectiveCounter:
    """`with CollectiveCounter() as c: ...` then `c.calls`, `c.total_bytes`, `c.by_op()`."""

    calls: list[Collective] = field(default_factory=list)
    _saved: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.calls)

    @property
    def largest(self) -> int:
        return max((c.bytes for c in self.calls), default=0)

    def by_op(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for c in self.calls:
            entry = out.setdefault(c.op, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += c.bytes
        return out

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            index = _FULL_SIZE_ARG.get(name, _PAYLOAD_ARG[name])
            # Positional payload, else the largest tensor passed by keyword.
            size = _nbytes(args[index]) if len(args) > index else max(map(_nbytes, kwargs.values()), default=0)
            self.calls.append(Collective(name, size))
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> "CollectiveCounter":
        for name in _PAYLOAD_ARG:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[dist, name] = fn
                setattr(dist, name, self._wrap(name, fn))
        # DeepSpeed's torch backend captured these two functions when it was initialised (ZeRO-3's gathers).
        deepspeed_backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        for attribute, name in (("all_gather_function", "all_gather_into_tensor"), ("reduce_scatter_function", "reduce_scatter_tensor")):
            fn = getattr(deepspeed_backend, attribute, None)
            if fn is not None:
                self._saved[deepspeed_backend, attribute] = fn
                setattr(deepspeed_backend, attribute, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        self._saved.clear()



class GradientTraffic:
    """What DDP all-reduces: `ddp.register_comm_hook(traffic, counting_allreduce_hook)` counts the gradient bytes
    of every bucket, then does exactly what DDP does without a hook (torch's reference `allreduce_hook`).

    `emulate_busbw` (bytes/s) makes the all-reduces take what a ring over a link of that bus bandwidth would
    (2(n-1)/n x bytes / busbw each, one after another: buckets share the link), padded in the completion
    callback: the throughput harness's slow-link sweep. Backward keeps running meanwhile, as it would behind
    a slow NCCL all-reduce.
    """

    def __init__(self, emulate_busbw: float | None = None):
        self.bytes = 0
        self.all_reduces = 0
        self.emulate_busbw = emulate_busbw
        self.link_free_at = 0.0  # perf_counter time the emulated link finishes its queued buckets


def counting_allreduce_hook(traffic: GradientTraffic, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    nbytes = buffer.numel() * buffer.element_size()
    traffic.bytes += nbytes
    traffic.all_reduces += 1
    future = allreduce_hook(None, bucket)  # None: the default process group, the one DDP reduces over
    if not traffic.emulate_busbw:
        return future
    n = dist.get_world_size()
    done_at = max(time.perf_counter(), traffic.link_free_at) + 2 * (n - 1) / n * nbytes / traffic.emulate_busbw
    traffic.link_free_at = done_at

    def padded(done):
        time.sleep(max(0.0, done_at - time.perf_counter()))
        return done.value()[0]

    return future.then(padded)
