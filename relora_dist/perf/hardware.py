"""Hardware profiles for the performance model: peak GEMM rate, DRAM bandwidth, memory, all-reduce bus bandwidth.

GPU values are vendor specs (dense bf16 with fp32 accumulate) and a-priori bus bandwidths from
research/perf_model.md sections 1 and 2.5. The bus bandwidth is NCCL's busbw of the gradient all-reduce
(algbw * 2(n-1)/n), the least known input: the paper never reported its links, so store a measured one
(nccl-tests all_reduce_perf) with every GPU run. `measure_cpu_profile` measures the same four numbers on the
spot for the CPU validation runs (section 3).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 GEMM, fp32 accumulate, per device (FLOP/s)
    mem_bw: float  # DRAM bandwidth per device (bytes/s)
    memory_bytes: float  # per device
    busbw: float  # gradient all-reduce bus bandwidth across the box (bytes/s)
    latency_s: float  # per ring step of one all-reduce (a bucket pays 2(n-1) of them)
    description: str = ""
    fp32_flops: float | None = None  # measured profiles only
    # Elements/s of unfused CPU dropout (bernoulli noise + multiply): RNG-bound, not bandwidth-bound. None on
    # GPUs, where dropout is one fused memory-bound kernel (its bytes are in the model's traffic terms).
    dropout_rate: float | None = None


PROFILES: dict[str, Hardware] = {
    "a100_40gb": Hardware("a100_40gb", 312e12, 1.555e12, 40 * GiB, 150e9, 10e-6,
                          "8x A100 SXM4 40GB, NVLink3 + NVSwitch (busbw a priori)"),
    "a100_80gb": Hardware("a100_80gb", 312e12, 2.039e12, 80 * GiB, 150e9, 10e-6,
                          "8x A100 SXM4 80GB, NVLink3 + NVSwitch (busbw a priori)"),
    "rtx6000_ada": Hardware("rtx6000_ada", 364.2e12, 0.96e12, 48 * GiB, 12e9, 30e-6,
                            "RTX 6000 Ada Generation, PCIe 4.0 x16, no NVLink (busbw a priori)"),
    # GeForce runs fp32-accumulate tensor math at half rate: 71 TF, not the 142 TF fp16-accumulate figure.
    "rtx3090": Hardware("rtx3090", 71e12, 0.936e12, 24 * GiB, 8e9, 30e-6,
                        "GeForce RTX 3090, PCIe 4.0, no P2P: all-reduce through host memory (busbw a priori)"),
    "h100_sxm": Hardware("h100_sxm", 989e12, 3.35e12, 80 * GiB, 360e9, 10e-6,
                         "8x H100 SXM5 80GB, NVLink4 + NVSwitch (busbw a priori)"),
    "h200": Hardware("h200", 989e12, 4.8e12, 141e9, 360e9, 10e-6,
                     "8x H200 SXM 141GB, NVLink4 + NVSwitch (busbw a priori)"),
}

# Substring of torch.cuda.get_device_name -> dense bf16 peak. Longer names first: "A10" is inside "A100",
# "L4" inside "L40S", "H100" inside "H100 PCIe".
_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("A30", 165e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 6000 Ada", 364.2e12), ("RTX A6000", 154.8e12),
    ("A6000", 154.8e12), ("4090", 165.2e12), ("3090", 71e12), ("A40", 149.7e12), ("B200", 2250e12),
)


def peak_flops_for(device=None) -> float | None:
    """Dense bf16 peak of a CUDA device (a torch.device, an index or a device name); None when unknown or not CUDA."""
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        name = device
    else:
        import torch

        if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
            return None
        name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


@dataclass(frozen=True)
class ProbeSizes:
    """How big the CPU probes are; the defaults take a few seconds on one core, tests shrink them."""

    gemm: int = 1024  # n of the n x n matmul
    copy_bytes: int = 128 * 2**20
    allreduce_bytes: int = 25 * 2**20  # one DDP bucket
    repeats: int = 5


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(n: int, dtype, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on the current thread count (median of `repeats`)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _median_time(lambda: torch.matmul(a, b), repeats)


def dropout_rate(numel: int, repeats: int = 5) -> float:
    """Elements/s of a training-mode fp32 dropout on the current thread count."""
    import torch

    x = torch.ones(numel)
    return numel / _median_time(lambda: torch.nn.functional.dropout(x, 0.1, training=True), repeats)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    # read + write, as the model counts traffic
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), repeats)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, world_size: int, port: int, threads: int, sizes: ProbeSizes, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        big = torch.ones(sizes.allreduce_bytes // 4)
        small = torch.ones(1)

        def timed(tensor, repeats):
            dist.barrier()  # every rank starts together, so the time is the collective's, not the skew
            return _median_time(lambda: dist.all_reduce(tensor), repeats)

        t_big, t_small = timed(big, sizes.repeats), timed(small, 4 * sizes.repeats)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"t_big": t_big, "t_small": t_small, "bytes": big.numel() * 4}, f)
    finally:
        dist.destroy_process_group()


def measure_allreduce(world_size: int = 2, *, threads: int = 1,
                      sizes: ProbeSizes = ProbeSizes()) -> tuple[float, float]:
    """(busbw, per-ring-step latency) of a gloo all-reduce across `world_size` local processes."""
    import torch.multiprocessing as mp

    if world_size < 2:
        return float("inf"), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "allreduce.json")
        mp.spawn(_allreduce_worker, args=(world_size, _free_port(), threads, sizes, out_path), nprocs=world_size)
        with open(out_path) as f:
            result = json.load(f)
    ring = 2 * (world_size - 1)
    busbw = result["bytes"] / result["t_big"] * ring / world_size
    return busbw, result["t_small"] / ring  # a tiny message is all latency: 2(n-1) ring steps


def measure_cpu_profile(threads: int = 1, world_size: int = 2, sizes: ProbeSizes = ProbeSizes()) -> Hardware:
    """This machine as a Hardware: one-process GEMM rate and copy bandwidth on `threads` threads, and the gloo
    all-reduce across `world_size` processes. The CPU validation runs use these with efficiencies of 1."""
    import torch

    if threads < 1 or world_size < 1:
        raise ValueError(f"threads ({threads}) and world size ({world_size}) must be >= 1 (--threads, --world-size)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bf16 = gemm_rate(sizes.gemm, torch.bfloat16, sizes.repeats)
        fp32 = gemm_rate(sizes.gemm, torch.float32, sizes.repeats)
        bandwidth = copy_bandwidth(sizes.copy_bytes, sizes.repeats)
        dropout = dropout_rate(sizes.copy_bytes // 16, sizes.repeats)
    finally:
        torch.set_num_threads(previous)
    busbw, latency = measure_allreduce(world_size, threads=threads, sizes=sizes)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        name="cpu", peak_flops=bf16, mem_bw=bandwidth, memory_bytes=memory, busbw=busbw, latency_s=latency,
        description=(f"this CPU, measured: {threads} thread(s) per process, bf16 GEMM n={sizes.gemm}, "
                     f"copy {sizes.copy_bytes / 2**20:.0f} MiB, gloo all-reduce {sizes.allreduce_bytes / 2**20:.0f} MiB "
                     f"x {world_size} processes"),
        fp32_flops=fp32, dropout_rate=dropout,
    )
