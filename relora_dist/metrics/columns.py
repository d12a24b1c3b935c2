"""The columns every metrics record shares, computed one way for the trainer (metrics.jsonl, TensorBoard, W&B)
and the benchmarks (relora-bench rows).

MFU follows the PaLM / nanoGPT / torchtitan convention (6N + 12 L h s FLOPs per token, N the full-rank model's
parameters, CoLA's own for CoLA); HFU counts the FLOPs the method executes (no dW for a frozen W): both by the cost
traits the method declares (`relora_dist.perf.accounting.CostTraits`, `Method.cost_traits`).
"""

from __future__ import annotations

import functools
import resource

import torch

from ..perf.accounting import CostTraits, ModelCounts

# Record keys -> TensorBoard / W&B tags (grouped as the dashboards show them); other numeric keys go under "other/".
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "skipped": "train/skipped_updates",
    "val_loss": "val/loss",
    "tokens_per_s": "throughput/tokens_per_s", "tokens_per_s_per_rank": "throughput/tokens_per_s_per_rank",
    "examples_per_s": "throughput/examples_per_s", "mfu": "throughput/mfu", "hfu": "throughput/hfu",
    "max_memory_allocated_gib": "memory/max_allocated_gib", "max_memory_reserved_gib": "memory/max_reserved_gib",
    "rss_gib": "memory/rss_gib", "max_rss_gib": "memory/max_rss_gib",
}
NOT_SCALARS = ("step", "wall_s")  # the x axes, not curves


def throughput_fields(*, tokens: int, examples: int, seconds: float, world_size: int) -> dict:
    """Global tokens/s and examples/s of `tokens` and `examples` processed in `seconds`, and tokens/s per rank."""
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_rank": tokens / seconds / world_size,
            "examples_per_s": examples / seconds}


# The CPU probe: a small GEMM first, the large one only where it is quick. Without native bf16 kernels a 1024 bf16
# GEMM runs at ~1 GFLOP/s (2 s each, 13 s for the probe on the 2-core CI box) and the small one measures the same rate.
CPU_PROBE_SIZES = (256, 1024)
CPU_PROBE_LARGE_MAX_S = 0.1  # the large GEMM is timed only if one is estimated to take less


def device_peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s per rank, where it came from): the GPU's dense bf16 peak from the table (None for a GPU it does not
    know), or on a CPU the GEMM rate measured in the run's dtype on this rank's threads (the best a CPU rank does),
    once per process (cpu_gemm_peak)."""
    from ..perf.hardware import peak_flops_for

    if device.type == "cuda":
        return peak_flops_for(device), f"bf16 dense peak of {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    rate, n = cpu_gemm_peak(dtype, threads)
    return rate, f"measured {dtype} GEMM (n {n}) on {threads} CPU thread(s)"


@functools.lru_cache(maxsize=None)
def cpu_gemm_peak(dtype: str, threads: int) -> tuple[float, int]:
    """(FLOP/s, n): the n x n GEMM rate in `dtype` (`threads` is the cache key: torch's thread count when measured)."""
    from ..perf.hardware import gemm_rate

    small, large = CPU_PROBE_SIZES
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    with torch.random.fork_rng(devices=[]):  # the caller's random streams stay as they are
        rate = gemm_rate(small, torch_dtype, repeats=3)
        if 2 * large**3 / rate > CPU_PROBE_LARGE_MAX_S:
            return rate, small
        return max(rate, gemm_rate(large, torch_dtype, repeats=5)), large


class Utilization:
    """MFU and HFU of a run from its model config, its method's cost traits and the device's peak FLOP/s (None: the
    columns are left out)."""

    def __init__(self, config, *, seq_len: int, rank: int, cost_traits: CostTraits, peak_flops: float | None):
        self.counts = ModelCounts.from_config(config, rank=rank, seq_len=seq_len, traits=cost_traits)
        self.cost_traits, self.peak_flops = cost_traits, peak_flops

    def fields(self, tokens_per_s_per_rank: float) -> dict:
        if not self.peak_flops:
            return {}
        return {"mfu": tokens_per_s_per_rank * self.counts.model_flops_per_token(self.cost_traits) / self.peak_flops,
                "hfu": tokens_per_s_per_rank * self.counts.executed_flops_per_token(self.cost_traits) / self.peak_flops}


def memory_fields(device: torch.device) -> dict:
    """GPU: the allocator's peaks since the last call (then reset); CPU: the process RSS now and its peak so far."""
    gib = 2**30
    if device.type == "cuda":
        fields = {"max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
                  "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
        torch.cuda.reset_peak_memory_stats(device)
        return fields
    return {"rss_gib": _rss_bytes() / gib, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scalar_tags(record: dict) -> dict[str, float]:
    """The record's numeric fields under their dashboard tags (booleans as 0/1; the step and wall clock left out)."""
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, (str, dict, list, tuple)) or value is None:
            continue
        out[TAGS.get(key, f"other/{key}")] = float(value)
    return out
