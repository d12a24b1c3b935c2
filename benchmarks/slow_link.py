"""Slow-link sweep: measured full-rank vs ReLoRA update times on 2 gloo ranks (the paper's DDP loop, an
all-reduce after every micro-batch) at emulated bus bandwidths, next to the performance model's CPU prediction.

    python benchmarks/slow_link.py            # ~5 min on 2 CPU cores; writes benchmarks/results/slow_link.{json,csv,png}

The model gets this machine's profile measured on the spot (GEMM rate, copy bandwidth, gloo all-reduce) and
one fitted scalar: eta_mm on the real-link full-rank point (eta_bw 1, phi 0). Every other point, all ReLoRA
points included, is predicted. Slow links are emulated by padding each DDP bucket's all-reduce, in its
completion callback, to 2(n-1)/n x bytes / busbw (relora_dist.comm.GradientTraffic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

from relora_dist.benchmarks.common import write_results
from relora_dist.methods import method_class
from relora_dist.models import llama_config
from relora_dist.perf import Efficiency, Workload, fit_efficiency, measure_cpu_profile, predict


def run_bench(args, links: list[float], out: str) -> list[dict]:
    command = [sys.executable, "-m", "relora_dist.benchmarks.throughput", "--nproc", "2", "--engines", "ddp",
               "--methods", "full,relora", "--allreduce-every-microbatch", "--emulate-busbw", ",".join(map(str, links)),
               "--preset", args.preset, "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
               "--rank", str(args.rank), "--micro-batch-size", str(args.micro_batch_size),
               "--accumulation-steps", str(args.accumulation_steps), "--updates", str(args.updates), "--out", out]
    subprocess.run(command, check=True)
    return json.loads(open(out).read())["rows"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="20m")
    p.add_argument("--vocab-size", type=int, default=4000, help="small, so the projections dominate as in the 1.3B")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulation-steps", type=int, default=2)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--busbw", default="0.3,0.1,0.03", help="emulated GB/s (the real link is always measured too)")
    p.add_argument("--out", default="benchmarks/results/slow_link.json")
    args = p.parse_args(argv)
    links = [0.0] + [float(x) for x in args.busbw.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        measured = run_bench(args, links, os.path.join(tmp, "runs.json"))
    cpu = measure_cpu_profile(threads=1, world_size=2)
    cpu = replace(cpu, peak_flops=cpu.fp32_flops)  # the runs are fp32
    config = llama_config(args.preset, vocab_size=args.vocab_size, max_positions=args.seq_len)
    base = Workload.from_config(config, rank=args.rank, seq_len=args.seq_len, world_size=2, precision="fp32",
                                global_batch=2 * args.micro_batch_size * args.accumulation_steps,
                                micro_batch=args.micro_batch_size, dropout_path="cpu")
    real_full = next(r for r in measured if r["method"] == "full" and not r["emulated_busbw_gbs"])

    def workload(method: str):  # a plain LLaMA's counts: the same layout for full rank and ReLoRA
        return replace(base, traits=method_class(method).cost_traits, label=method)

    efficiency = fit_efficiency(workload("full"), cpu, real_full["examples_per_s"], eta_bw=1.0, phi=0.0)

    rows = []
    for r in measured:
        link = r["emulated_busbw_gbs"]
        hardware = replace(cpu, busbw=link * 1e9) if link else cpu
        prediction = predict(workload(r["method"]), hardware, Efficiency(efficiency.eta_mm, 1.0, 0.0))
        rows.append({"method": r["method"], "busbw_gbs": link or cpu.busbw / 1e9, "emulated": bool(link),
                     "measured_update_s": r["update_s"], "predicted_update_s": prediction.t_update,
                     "error": prediction.t_update / r["update_s"] - 1, "measured_exposed_comm_s": r["exposed_comm_s"],
                     "predicted_exposed_comm_s": prediction.allreduces_per_update * prediction.t_exposed,
                     "bytes_per_update": r["bytes_per_update"], "fitted": r is real_full})
    speedups = []
    for link in sorted({row["busbw_gbs"] for row in rows}, reverse=True):
        pair = {row["method"]: row for row in rows if row["busbw_gbs"] == link}
        measured_ratio = pair["full"]["measured_update_s"] / pair["relora"]["measured_update_s"]
        predicted_ratio = pair["full"]["predicted_update_s"] / pair["relora"]["predicted_update_s"]
        speedups.append({"busbw_gbs": link, "measured_speedup": measured_ratio - 1, "predicted_speedup": predicted_ratio - 1,
                         "ratio_error": predicted_ratio / measured_ratio - 1})
    for row in rows:
        print(f"{row['method']:>6} at {row['busbw_gbs']:6.3f} GB/s: measured {row['measured_update_s']:.3f} s, "
              f"model {row['predicted_update_s']:.3f} s ({100 * row['error']:+.1f}%){'  (fitted)' if row['fitted'] else ''}")
    for s in speedups:
        print(f"ReLoRA speedup at {s['busbw_gbs']:6.3f} GB/s: measured {100 * s['measured_speedup']:+.1f}%, "
              f"model {100 * s['predicted_speedup']:+.1f}% (full/ReLoRA ratio off by {100 * s['ratio_error']:+.1f}%)")
    write_results(rows, args.out, extra={"speedups": speedups, "cpu_profile": cpu.__dict__, "eta_mm": efficiency.eta_mm,
                                         "settings": vars(args)}, plot=lambda _, png: plot(speedups, png))
    return 0


def plot(speedups: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    links = [s["busbw_gbs"] for s in speedups]
    ax.plot(links, [100 * s["predicted_speedup"] for s in speedups], "-", label="model")
    ax.plot(links, [100 * s["measured_speedup"] for s in speedups], "o", label="measured (2 gloo ranks)")
    ax.set_xscale("log")
    ax.set_xlabel("bus bandwidth, GB/s (emulated below the real gloo link)")
    ax.set_ylabel("ReLoRA speedup over full rank, %")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
