"""Where a rank's memory goes: a census of the live tensors by category, the exact expectation, and peaks.

The census walks what the engine really holds (module parameters and buffers, gradients, the optimizer
chain's states and its own parameter copies, every other live tensor found by the garbage collector),
counting each storage once. Tensors held only in C++ (DDP's gradient buckets, NCCL buffers) are invisible
to it: the sampled peak (NVML on a GPU, the process RSS on a CPU) is what sees them.
"""

from __future__ import annotations

import gc
import threading
import time
import warnings

import torch
from torch import nn

from .accounting import CostTraits, ModelCounts, Precision, static_bytes

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "projectors", "master", "exact_copies", "other")

# What each engine shards across ranks, by category (fairscale / ZeroRedundancyOptimizer shard whole parameters, so a
# GaLore projector lives with its matrix's owner; the engines that split rows keep every projector on every rank).
_SHARDED = {
    "ddp": (), "zero0": (), "zero1": ("optimizer", "master"), "zero2": ("optimizer", "master", "gradients"),
    "zero3": ("optimizer", "master", "gradients", "parameters", "exact_copies"), "fsdp2": ("optimizer", "gradients", "parameters"),
    "fairscale": ("optimizer", "projectors"), "zero_redundancy": ("optimizer", "projectors"),
}
# Engines that split every matrix's rows across all ranks: the moments of GaLore's left-projected matrices (r x n) are
# whole on every rank there (ZeRO-1/2 keep a matrix mostly whole in one partition: its moments on that rank).
_SPLITS_EVERY_MATRIX = ("zero3", "fsdp2")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    local = getattr(tensor, "_local_tensor", None)  # DTensor: this rank's shard
    return local if local is not None else tensor


def _optimizer_chain(optimizer) -> list:
    """The wrapper and what it wraps (DeepSpeed's .optimizer, OSS / ZeroRedundancyOptimizer's .optim)."""
    chain = []
    while optimizer is not None and all(optimizer is not seen for seen in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
    return chain


class _Census:
    def __init__(self):
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self._seen: set[int] = set()

    def add(self, tensor, category: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        try:
            storage = _local(tensor).untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta or wrapper tensors without storage
            return
        key = storage.data_ptr()
        if storage.nbytes() and key not in self._seen:
            self._seen.add(key)
            self.bytes[category] += storage.nbytes()


def tensor_census(model: nn.Module, optimizer, engine_held: dict[str, list[torch.Tensor]] | None = None) -> dict[str, int]:
    """Bytes this rank holds, by category; first claim wins, in the order of CATEGORIES. `engine_held`: what the engine
    keeps beside the module and the optimizer (`Backend.engine_held_tensors`)."""
    census = _Census()
    params = list(model.parameters())
    for p in params:
        census.add(getattr(p, "ds_tensor", None), "parameters")  # ZeRO-3 partition (p itself may be empty)
        census.add(p, "parameters")
    for b in model.buffers():
        census.add(b, "buffers")
    chain = _optimizer_chain(optimizer)
    inner_params = [p for opt in chain for group in getattr(opt, "param_groups", []) for p in group["params"]]
    for p in params + inner_params:
        census.add(p.grad, "gradients")
    for opt in chain:
        for state in getattr(opt, "state", {}).values():
            for key, value in state.items() if isinstance(state, dict) else ():
                census.add(value, "projectors" if key == "projector" else "optimizer")
    for p in inner_params:
        census.add(p, "master")  # parameters the optimizer steps that are not the module's: fp32 master copies
    for opt in chain:  # DeepSpeed ZeRO-1/2 keep the reduced gradient partitions here, not in .grad
        census.add(getattr(opt, "grads_in_partition", None), "gradients")
        for grads in (getattr(opt, "averaged_gradients", None) or {}).values():
            for g in grads or ():
                census.add(g, "gradients")
    for category, tensors in (engine_held or {}).items():
        for tensor in tensors:
            census.add(tensor, category)
    with warnings.catch_warnings():  # isinstance() on some gc-tracked proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not _in_shared_memory(obj):
                census.add(obj, "other")
    return census.bytes


def _in_shared_memory(tensor: torch.Tensor) -> bool:
    """Inter-process buffers (DeepSpeed's CPU shm collectives): a transport, not this rank's training state."""
    try:
        return _local(tensor).untyped_storage().is_shared()
    except (RuntimeError, NotImplementedError):
        return False


def precision_of(engine: str, dtype: str) -> Precision:
    """What each engine keeps per parameter: DeepSpeed bf16 has bf16 params over fp32 masters; everything else
    keeps fp32 parameters (bf16 is autocast or FSDP2's transient unsharded copies); DeepSpeed ZeRO-1/2/3 keep a
    separate fp32 partition to step even in fp32."""
    if engine.startswith("zero") and engine[4:].isdigit():
        if dtype == "bf16":
            return Precision.named("bf16_master")
        return Precision(master=4) if engine != "zero0" else Precision.named("fp32")
    return Precision.named("fp32")


def expected_static_bytes(counts: ModelCounts, traits: CostTraits, engine: str, dtype: str,
                          world_size: int) -> dict[str, float]:
    """Per-rank bytes by category from the exact counts of a method's cost traits, sharded categories divided by the
    world size (engines pad partitions a little: the census shows by how much), GaLore's left-projected moments whole
    on every rank where every matrix's rows are split."""
    if engine not in _SHARDED:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(_SHARDED)}")
    precision = precision_of(engine, dtype)
    full = static_bytes(counts, traits, precision)
    out = {k: v / world_size if k in _SHARDED[engine] else v for k, v in full.items()}
    if traits.projected_state and engine in _SPLITS_EVERY_MATRIX:
        replicated = precision.adam * counts.n_left_projected  # 2 moments of r x n, adam bytes per moment pair
        out["optimizer"] += replicated - replicated / world_size
    return out


class PeakSampler:
    """Samples device memory in a background thread: NVML `used` on a GPU (context, NCCL and allocator
    included: what nvidia-smi shows), the process RSS on a CPU. `with PeakSampler(device) as s: ...; s.peak`."""

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device, self.interval_s = device, interval_s
        self.peak = 0
        self.source = ""
        self._stop = threading.Event()
        self._read = self._reader()

    def _reader(self):
        if self.device.type == "cuda":
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except pynvml.NVMLError:  # fall back to the index (right when CUDA_VISIBLE_DEVICES is unset)
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            self.source = "NVML used (whole device)"
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        import psutil

        process = psutil.Process()
        self.source = "process RSS"
        return lambda: process.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakSampler":
        self.peak = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
