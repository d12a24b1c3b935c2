"""The two ways to give GaLore / Fira's official (std) projection to engines that split rows, timed on real ranks.

A left-projected matrix (m < n: down_proj, k/v under GQA) has R = P^T G = the sum over the ranks of P_rows^T G_rows.
Either
  all_reduce      every rank gets R (r x n) and keeps that matrix's moments whole (what relora_dist does), or
  reduce_scatter  each rank gets a column shard of R and keeps moments of its columns only; the update of its rows
                  then needs N = m / (sqrt(v) + eps) of every column back (an all-gather of r x n), Fira's residual R
                  and phi too (a second all-gather of r x n; phi's n floats ride along).
This times both collective patterns on the left-projected matrices' buffer of a preset, one bucket per update as the
optimizer sends it, and records the bytes each rank sends and the moments each rank keeps.

    python -m relora_dist.benchmarks.projection_collectives --nproc 2 --presets 20m,350m \
        --out benchmarks/results/projection_collectives.json
"""

from __future__ import annotations

import argparse
import sys
import time
from statistics import median

import torch
import torch.distributed as dist

from relora_dist.benchmarks.common import write_results
from relora_dist.benchmarks.throughput import spawn
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.methods.galore.method import galore_rank
from relora_dist.models import llama_config
from relora_dist.perf.accounting import FULL_RANK, ModelCounts


def left_elements(preset: str, rank: int | None) -> tuple[int, int]:
    """(R's elements of every left-projected matrix of `preset`, the rank): the bucket one update all-reduces."""
    config = llama_config(preset, vocab_size=32000)
    r = rank or galore_rank(None, config.hidden_size)
    return ModelCounts.from_config(config, rank=r, seq_len=1, traits=FULL_RANK).n_left_projected, r


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first one warms the transport up
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times[1:])


def measure(preset: str, rank: int | None, repeats: int) -> list[dict]:
    elements, r = left_elements(preset, rank)
    world = dist.get_world_size()
    columns = -(-elements // world)  # padded so that every rank's shard is the same size
    bucket = torch.randn(columns * world)
    shard = torch.empty(columns)
    both = torch.empty(2 * columns * world)

    def all_reduce():
        dist.all_reduce(bucket)

    def scatter_then_gather(count: int):
        dist.reduce_scatter_single(shard, bucket)
        dist.all_gather_single(both[: count * columns * world], torch.cat([shard] * count) if count > 1 else shard)

    payload = 4 * elements
    patterns = {
        "all_reduce": (all_reduce, 2 * (world - 1) / world * payload, 8 * elements),
        "reduce_scatter + all_gather N (GaLore)": (lambda: scatter_then_gather(1), 2 * (world - 1) / world * payload,
                                                     8 * elements / world),
        "reduce_scatter + all_gather N, R (Fira)": (lambda: scatter_then_gather(2), 3 * (world - 1) / world * payload,
                                                      8 * elements / world),
    }
    return [{"preset": preset, "rank": r, "world_size": world, "pattern": name, "payload_bytes": payload,
             "sent_bytes_per_rank": sent, "moment_bytes_per_rank": kept, "seconds": timed(fn, repeats)}
            for name, (fn, sent, kept) in patterns.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="20m,350m")
    p.add_argument("--rank", type=int, default=None, help="default: GaLore's official rank for each size")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--nproc", type=int, default=None, help="spawn this many ranks with torchrun")
    p.add_argument("--out", default="benchmarks/results/projection_collectives.json")
    args = p.parse_args(argv)
    if args.nproc:
        args.module, args.threads = "relora_dist.benchmarks.projection_collectives", 1
        return spawn(args, sys.argv[1:] if argv is None else argv)
    info = init_distributed()
    rows = [row for preset in args.presets.split(",") for row in measure(preset, args.rank, args.repeats)]
    if info.rank == 0:
        for row in rows:
            print(f"{row['preset']:>6} r={row['rank']:<4} {row['pattern']:<42} {row['payload_bytes'] / 2**20:8.2f} MiB "
                  f"payload, {row['sent_bytes_per_rank'] / 2**20:8.2f} MiB sent, {1e3 * row['seconds']:8.2f} ms, moments "
                  f"{row['moment_bytes_per_rank'] / 2**20:.2f} MiB per rank", flush=True)
        write_results(rows, args.out, extra={"argv": sys.argv[1:]})
    close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
