"""relora-memprof: per-rank memory of every method (the registry's; full rank and ReLoRA by default) on each engine.

    relora-memprof --nproc 2 --preset 60m --engines ddp,zero2,zero3,fsdp2 --methods full,relora --plot
    torchrun --nproc_per_node 8 -m relora_dist.benchmarks.memory --preset 1b --seq-len 512 --dtype bf16 \
        --micro-batch-size 8 --gpu-memory-gb 40 --snapshot snapshots/

Per rank and case: static bytes by category, exact from the parameter counts (sharded categories divided
by the world size) next to a census of the live tensors the engine really holds (parameters, buffers,
gradients, optimizer states, fp32 masters, other tensors), taken between the last backward and the step
of a real update; peak memory (GPU: max allocated / reserved, allocator retries, NVML sampled in a
background thread; CPU: the process RSS sampled the same way); saved-activation bytes per token measured
with saved_tensors_hooks on the plain model; and the largest micro-batch that fits --gpu-memory-gb.
Shares its options with relora-bench (model, engines, batch); results as JSON + CSV (+ PNG with --plot).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from relora_dist.benchmarks.common import cases, keep_host_memory, write_results
from relora_dist.benchmarks.throughput import Case, bench_method, parse_args, spawn
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.train.build import build_method_model, run_model_config
from relora_dist.perf import CostTraits, ModelCounts
from relora_dist.perf.activations import layer_bytes_per_token, saved_bytes_per_token
from relora_dist.perf.memory import CATEGORIES, PeakSampler, expected_static_bytes, tensor_census

GIB = 2**30
CONTEXT_BYTES = GIB  # CUDA context + NCCL, as the performance model assumes
FRAGMENTATION = 0.08


def extra_args(parser) -> None:
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory to fit the micro-batch into")
    parser.add_argument("--snapshot", default=None, help="GPU only: write torch memory snapshots (pickle) into this folder")


def activation_bytes_per_token(args, name: str) -> float:
    """Measured on the plain model (engine independent), in the run's compute dtype, on this rank's device."""
    method = bench_method(args, name)
    torch.manual_seed(0)
    config = run_model_config(method, args.preset, vocab_size=args.vocab_size, max_positions=args.seq_len)
    model = build_method_model(method, config, method.phases()[-1][0])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens = torch.randint(0, args.vocab_size, (1, args.seq_len), device=device)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    return saved_bytes_per_token(model.to(device), tokens, autocast_dtype=autocast)


def layer_activation_bytes(args, config, traits: CostTraits, rank: int | None) -> int:
    """The decoder layers' part of the measured figure, by the exact per-layer accounting (CPU eager path)."""
    per_layer = layer_bytes_per_token(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                                      traits=traits, element_size=2 if args.dtype == "bf16" else 4, rank=rank or 0,
                                      dropout=args.lora_dropout > 0, only_lr_act=getattr(config, "only_lr_act", False),
                                      kv_width=config.hidden_size * config.num_key_value_heads // config.num_attention_heads)
    return config.num_hidden_layers * per_layer


def largest_micro_batch(static_bytes: float, per_example: float, memory_bytes: float) -> int:
    free = memory_bytes * (1 - FRAGMENTATION) - CONTEXT_BYTES - static_bytes
    return max(0, math.floor(free / per_example))


def profile_case(args, info, method: str, engine: str, act_per_token: float) -> dict:
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)
        if args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
    census = {}
    with PeakSampler(info.device) as sampler:
        case = Case(args, info, method, engine, 0.0)
        case.update()  # optimizer states exist from here on
        case.update(before_step=lambda: census.update(tensor_census(case.backend.unwrapped_model, case.backend.optimizer,
                                                                    case.backend.engine_held_tensors())))
    traits = case.method.cost_traits
    counts = ModelCounts.from_config(case.config, rank=args.rank, seq_len=args.seq_len, traits=traits)
    rank = case.method.resolved_rank(case.config)
    expected = expected_static_bytes(counts, traits, engine, args.dtype, info.world_size)
    static_measured = sum(v for k, v in census.items() if k != "other")
    per_example = act_per_token * args.seq_len
    row = {
        "preset": args.preset, "method": method, "engine": engine, "dtype": args.dtype, "world_size": info.world_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "rank": rank,
        **{f"census_{k}": census[k] for k in CATEGORIES},
        **{f"expected_{k}": expected[k] for k in expected},
        "static_census": static_measured, "static_expected": sum(expected.values()),
        "activation_bytes_per_token": act_per_token, "activation_bytes_per_example": per_example,
        "layer_activation_bytes_per_token": layer_activation_bytes(args, case.config, traits, rank),
        "peak_sampled": sampler.peak, "peak_source": sampler.source,
        "gpu_memory_gb": args.gpu_memory_gb,
        "largest_micro_batch": largest_micro_batch(static_measured, per_example, args.gpu_memory_gb * 1e9),
    }
    if cuda:
        stats = torch.cuda.memory_stats(info.device)
        row.update(max_memory_allocated=torch.cuda.max_memory_allocated(info.device),
                   max_memory_reserved=torch.cuda.max_memory_reserved(info.device),
                   num_alloc_retries=stats.get("num_alloc_retries", 0), num_ooms=stats.get("num_ooms", 0))
        if args.snapshot:
            Path(args.snapshot).mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(f"{args.snapshot}/{engine}_{method}_rank{info.rank}.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
    case.close()
    return row


def describe(row: dict) -> str:
    parts = "  ".join(f"{k} {row[f'census_{k}'] / 2**20:.1f}" for k in CATEGORIES if row[f"census_{k}"])
    return (f"{row['engine']:>15} {row['method']:>6}: static {row['static_census'] / 2**20:8.1f} MiB"
            f" (expected {row['static_expected'] / 2**20:8.1f}; {parts})  peak {row['peak_sampled'] / 2**20:8.1f} MiB"
            f" [{row['peak_source']}]  activations {row['activation_bytes_per_token'] / 1024:.1f} KiB/token"
            f"  largest micro-batch in {row['gpu_memory_gb']:g} GB: {row['largest_micro_batch']}")


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']}\n{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for k in CATEGORIES[:-1]:  # "other" (engine buffers, often reserved but untouched) would dwarf the rest: see the table
        values = [r[f"census_{k}"] / 2**20 for r in rows]
        ax.bar(labels, values, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(labels, [r["static_expected"] / 2**20 for r in rows], marker="_", s=900, color="black", label="expected static", zorder=3)
    ax.set_ylabel("MiB per rank (census after backward)")
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[0]['preset']}, {rows[0]['dtype']}, {rows[0]['world_size']} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog="relora-memprof", doc=__doc__, extend=extra_args, module="relora_dist.benchmarks.memory",
                      default_out="benchmarks/results/memory.json")
    if args.nproc and "RANK" not in os.environ:
        return spawn(args, argv)
    info = init_distributed()
    keep_host_memory(info.device)
    activations = {m: activation_bytes_per_token(args, m) for m in args.methods.split(",")}
    rows = []
    pairs, skipped = cases(args.methods.split(","), args.engines.split(","))
    if info.rank == 0:
        for note in skipped:
            print(f"skipped {note}", flush=True)
    for engine, method in pairs:
        row = profile_case(args, info, method, engine, activations[method])
        rows.append(row)
        if info.rank == 0:
            print(describe(row), flush=True)
    if info.rank == 0:
        write_results(rows, args.out, extra={"argv": argv, "per_rank": True}, plot=plot if args.plot else None)
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
