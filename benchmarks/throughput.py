"""relora-bench: training throughput of every method (the registry's; full rank and ReLoRA by default) per engine,
on real optimizer updates.

    relora-bench --nproc 2 --preset 20m --engines ddp,fsdp2,zero2 --methods full,relora      # spawns torchrun
    torchrun --nproc_per_node 8 -m relora_dist.benchmarks.throughput --preset 1b --seq-len 512 \
        --micro-batch-size 16 --accumulation-steps 9 --dtype bf16 --allreduce-every-microbatch   # the paper's loop
    relora-bench --nproc 2 --emulate-busbw 0,0.1,0.03 --allreduce-every-microbatch   # slow-link sweep (DDP)

Per case: warm-up updates, then the median of the measured ones (rank 0's wall clock, synchronised).
Reported: global and per-GPU examples/s and tokens/s; MFU (6N + 12 L h s per token) and HFU (executed
FLOPs: no dW for frozen W) against the device's bf16/fp32 peak (on a CPU, a GEMM rate measured on the
spot); the split forward / backward / exposed communication / optimizer, where exposed communication is
the fwd+bwd time above a compute-only pass with every gradient reduction switched off; the bytes sent per
update (counted: every torch.distributed call, DDP's reducer routed through a comm hook); each method's
recurring events (ReLoRA: one merge + reset, every --merge-every updates) timed and counted once, and
amortised over their periods. Each method runs its last phase (ReLoRA and LoRA + WS: the low-rank one).
Tokens are random: throughput does not depend on the text. Results: JSON + CSV (+ PNG with --plot).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import statistics
import subprocess
import sys
import time

import torch

from relora_dist.benchmarks.common import (ENGINES, Stopwatch, build_engine, cases, keep_host_memory, synchronize,
                                           torchrun_command, write_results)
from relora_dist.comm import CollectiveCounter
from relora_dist.methods.relora.config import DROPOUT_MASKS
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.methods import method_names
from relora_dist.train.build import build_and_set_up, run_model_config
from relora_dist.train.config import standalone_method
from relora_dist.models import causal_lm_loss
from relora_dist.metrics import Utilization, device_peak_flops, memory_fields, throughput_fields

DDP_LOOP_ENGINES = ("ddp", "zero_redundancy")  # engines whose gradient all-reduce the harness can count and pad


def parse_args(argv=None, *, prog="relora-bench", doc=__doc__, extend=None, module="relora_dist.benchmarks.throughput",
               default_out="benchmarks/results/throughput.json") -> argparse.Namespace:
    """The options every harness shares (relora-memprof adds its own through `extend(parser)`)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--preset", default="20m", help="model size (SPEC section 5)")
    p.add_argument("--vocab-size", type=int, default=32100, help="the paper's T5 vocabulary by default")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--methods", default="full,relora", help=f"comma list of {', '.join(method_names())}, or all; a method is"
                   " measured on the engines it supports")
    p.add_argument("--engines", default="ddp", help=f"comma list of {', '.join(ENGINES)} (zeroN: DeepSpeed stage N), or all")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--rank", type=int, default=128, help="rank of the low-rank methods (every projection is wrapped)")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--fused-kernels", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--shared-lora-input", action="store_true",
                   help="q/k/v and gate/up share one LoRA dropout mask and down-projection GEMM (relora-train --shared-lora-input)")
    p.add_argument("--lora-dropout-mask", default="aten", choices=DROPOUT_MASKS,
                   help="how the LoRA dropout draws its mask (relora-train --lora-dropout-mask)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (Inductor), as relora-train --compile;"
                   " the warm-up updates absorb the compilation")
    p.add_argument("--interleave", action="store_true",
                   help="per engine, keep every method's case alive and alternate their updates (ratios robust to a drifting box)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulation-steps", type=int, default=2)
    p.add_argument("--warmup-updates", type=int, default=1)
    p.add_argument("--updates", type=int, default=3, help="measured updates (the median is reported)")
    p.add_argument("--merge-every", type=int, default=1000, help="updates per ReLoRA cycle, to amortise its merge + reset")
    p.add_argument("--update-gap", type=int, default=200,
                   help="updates between GaLore/Fira projector refreshes (--galore-update-gap); 1: every update refreshes")
    p.add_argument("--galore-proj", default="std", choices=("std", "right", "left"),
                   help="GaLore/Fira's projection side (--galore-proj): std, the official; right, the named variant")
    p.add_argument("--allreduce-every-microbatch", action="store_true",
                   help="the paper's DDP loop: all-reduce after every micro-batch (no no_sync); DDP engines only")
    p.add_argument("--emulate-busbw", default="",
                   help="comma list of GB/s (0 = the real link): pad DDP's all-reduces to this bus bandwidth")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak used for MFU/HFU")
    p.add_argument("--nproc", type=int, default=None, help="spawn this many ranks with torchrun (not under a launcher)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per spawned rank (OMP_NUM_THREADS)")
    p.add_argument("--out", default=default_out)
    p.add_argument("--plot", action="store_true", help="also write a PNG beside --out")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    if extend is not None:
        extend(p)
    args = p.parse_args(argv)
    args.module = module
    if args.methods == "all":  # every registered method, on the engines each supports
        args.methods = ",".join(method_names())
    if args.engines == "all":
        args.engines = ",".join(ENGINES)
    for method in args.methods.split(","):
        if method not in method_names():
            p.error(f"--methods: unknown method {method!r} ({', '.join(method_names())})")
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            p.error(f"--engines: unknown engine {engine!r} ({', '.join(ENGINES)})")
    if (args.allreduce_every_microbatch or args.emulate_busbw) and set(args.engines.split(",")) - set(DDP_LOOP_ENGINES):
        p.error(f"--allreduce-every-microbatch and --emulate-busbw apply to {', '.join(DDP_LOOP_ENGINES)} only (--engines)")
    if min(args.micro_batch_size, args.accumulation_steps, args.updates) < 1 or args.warmup_updates < 0:
        p.error("--micro-batch-size, --accumulation-steps and --updates must be >= 1, --warmup-updates >= 0")
    return args


def spawn(args, argv) -> int:
    """Re-run this module under torchrun with --nproc ranks (one thread each on a CPU by default)."""
    forwarded = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
                 and not a.startswith("--nproc=")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = torchrun_command(args.nproc, "-m", args.module, *forwarded)
    return subprocess.call(command, env=env)


def _batches(seed: int, count: int, args) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len), generator=generator) for _ in range(count)]


def bench_method(args, name: str):
    """Registered method `name` with the harness's settings (rank, LoRA dropout, fused kernels, merge period, GaLore's
    refresh period and projection side)."""
    return standalone_method(name, rank=args.rank, alpha=32.0, dropout=args.lora_dropout, fused_kernels=args.fused_kernels,
                             shared_lora_input=args.shared_lora_input, dropout_mask=args.lora_dropout_mask,
                             merge_every=args.merge_every, restart_warmup_steps=0, update_gap=args.update_gap,
                             proj=args.galore_proj)


class Case:
    """One (method, engine, link) configuration on every rank of the process group, in the method's last phase."""

    def __init__(self, args, info, method: str, engine: str, busbw_gbs: float):
        self.args, self.info, self.engine, self.busbw_gbs = args, info, engine, busbw_gbs
        self.method_name, self.method = method, bench_method(args, method)
        self.config = run_model_config(self.method, args.preset, vocab_size=args.vocab_size, max_positions=args.seq_len)
        # DDP's reducer all-reduces in C++; the counting hook routes it through dist.all_reduce, which the
        # CollectiveCounter sees like every other engine's collectives.
        ddp_loop = {"count_gradient_bytes": True, "allreduce_every_microbatch": args.allreduce_every_microbatch,
                    "emulate_busbw": busbw_gbs * 1e9 or None} if engine in DDP_LOOP_ENGINES else {}
        torch.manual_seed(0)
        # the trainer's build sequence, in the method's last phase
        self.backend, model, _ = build_and_set_up(
            self.method, self.config, self.method.phases()[-1][0],
            lambda: build_engine(engine, args.dtype, info.device, micro_batch_size=args.micro_batch_size,
                                 accumulation_steps=args.accumulation_steps, max_norm=1.0, **ddp_loop),
            compile=args.compile, compile_backend="inductor")
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.updates_run = 0

    def _forward_backward(self, watch: Stopwatch, batches, *, compute_only: bool) -> None:
        backend, n = self.backend, len(batches)
        for i, batch in enumerate(batches):
            last = i == n - 1
            sync = backend.compute_only() if compute_only else (contextlib.nullcontext() if last else backend.no_sync())
            with sync:
                with watch("forward"), backend.forward_context():
                    loss = causal_lm_loss(backend.model, batch.to(self.info.device)) / n
                with watch("backward"):
                    backend.backward(loss)

    def update(self, before_step=None) -> dict:
        """One optimizer update: seconds per phase, bytes sent, wall time. `before_step()` runs between the last
        backward and the step (gradients and optimizer state both alive: the memory census)."""
        seed = 1000 * self.updates_run + self.info.rank
        batches = _batches(seed, self.args.accumulation_steps, self.args)
        watch = Stopwatch(self.info.device)
        synchronize(self.info.device)
        start = time.perf_counter()
        with CollectiveCounter() as counter:
            self._forward_backward(watch, batches, compute_only=False)
            if before_step is not None:
                before_step()
            with watch("optimizer"):
                self.backend.step(lr=1e-4, max_norm=1.0)
                self.backend.zero_grad()
        synchronize(self.info.device)
        self.updates_run += 1
        return {**watch.seconds, "update_s": time.perf_counter() - start,
                "bytes": counter.total_bytes, "by_op": counter.by_op()}

    def compute_only_seconds(self) -> float:
        """fwd + bwd of one update's micro-batches with no gradient reduction (grads then dropped)."""
        watch = Stopwatch(self.info.device)
        self._forward_backward(watch, _batches(7, self.args.accumulation_steps, self.args), compute_only=True)
        self.backend.zero_grad()
        return watch.seconds["forward"] + watch.seconds["backward"]

    def periodic_events(self) -> tuple[float, float, int, dict]:
        """Each recurring event of the method once: (seconds, seconds amortised per update, bytes sent, and per event
        name its seconds, bytes sent and period in updates)."""
        seconds = amortised = 0.0
        each = {}
        for event, period in self.method.periodic_events():
            with CollectiveCounter() as counter:
                synchronize(self.info.device)
                start = time.perf_counter()
                self.method.apply(event, self.backend.unwrapped_model, self.backend.shard_access())
                synchronize(self.info.device)
                elapsed = time.perf_counter() - start
            seconds += elapsed
            amortised += elapsed / period
            each[event.name] = {"s": elapsed, "bytes": counter.total_bytes, "every": period}
        return seconds, amortised, sum(e["bytes"] for e in each.values()), each

    def close(self) -> None:
        self.backend.close()
        self.backend = None
        gc.collect()


def run_cases(args, info, methods: list[str], engine: str, busbw_gbs: float, peak: tuple[float, str]) -> list[dict]:
    """The methods' cases alive at once, their updates alternated (A B A B ...): with several (--interleave) the drift
    of a shared box hits them alike and their ratio is taken update against update; with one, a plain run."""
    cases = [Case(args, info, method, engine, busbw_gbs) for method in methods]
    measured: list[list[dict]] = [[] for _ in cases]
    for i in range(args.warmup_updates + args.updates):
        for case, samples in zip(cases, measured):
            result = case.update()
            if i >= args.warmup_updates:
                samples.append(result)
    return [summarize(args, info, case, samples, busbw_gbs, peak) for case, samples in zip(cases, measured)]


def summarize(args, info, case: Case, measured: list[dict], busbw_gbs: float, peak: tuple[float, str]) -> dict:
    """The row of a measured case (then closed): medians, exposed comm, its periodic events, FLOP counts."""
    method, engine = case.method_name, case.engine
    median = {key: statistics.median(m.get(key, 0.0) for m in measured)
              for key in ("update_s", "forward", "backward", "optimizer", "bytes")}
    exposed = None
    if case.backend.defers_gradient_sync and info.world_size > 1:
        baseline = statistics.median(case.compute_only_seconds() for _ in range(max(1, args.updates // 2)))
        exposed = max(0.0, median["forward"] + median["backward"] - baseline)
    merge_s, merge_amortised_s, merge_bytes, events = case.periodic_events()
    traits = case.method.cost_traits
    low_rank = traits.adapters  # the adapter knobs (rank, dropout, input sharing) apply
    global_batch = args.micro_batch_size * args.accumulation_steps * info.world_size
    update_s, n = median["update_s"], info.world_size
    speed = throughput_fields(tokens=global_batch * args.seq_len, examples=global_batch, seconds=update_s, world_size=n)
    peak_flops, peak_source = peak
    utilization = Utilization(case.config, seq_len=args.seq_len, rank=args.rank, cost_traits=traits,
                              peak_flops=peak_flops)
    amortised_s = update_s + merge_amortised_s
    row = {
        "preset": args.preset, "method": method, "engine": engine, "dtype": args.dtype, "world_size": n,
        "micro_batch_size": args.micro_batch_size, "accumulation_steps": args.accumulation_steps,
        "global_batch_size": global_batch, "seq_len": args.seq_len, "rank": args.rank if low_rank else None,
        "lora_dropout": args.lora_dropout if low_rank else None, "compile": args.compile,
        "shared_lora_input": args.shared_lora_input if low_rank else None,
        "lora_dropout_mask": args.lora_dropout_mask if low_rank else None, "interleaved": args.interleave,
        "allreduce_every_microbatch": args.allreduce_every_microbatch, "emulated_busbw_gbs": busbw_gbs or None,
        "update_s": update_s, "update_s_all": [m["update_s"] for m in measured],
        "examples_per_s": speed["examples_per_s"], "examples_per_s_per_gpu": speed["examples_per_s"] / n,
        "tokens_per_s": speed["tokens_per_s"], "tokens_per_s_per_gpu": speed["tokens_per_s_per_rank"],
        "forward_s": median["forward"], "backward_s": median["backward"], "optimizer_s": median["optimizer"],
        "exposed_comm_s": exposed, "bytes_per_update": int(median["bytes"]), "collectives": measured[-1]["by_op"],
        "trainable_parameters": case.trainable,
        "model_flops_per_token": utilization.counts.model_flops_per_token(traits),
        "executed_flops_per_token": utilization.counts.executed_flops_per_token(traits),
        "peak_flops_per_gpu": peak_flops, "peak_source": peak_source,
        **utilization.fields(speed["tokens_per_s_per_rank"]),
        "merge_reset_s": merge_s, "merge_reset_bytes": merge_bytes, "merge_every": args.merge_every, "events": events,
        "examples_per_s_amortised": global_batch / amortised_s,
    }
    row.update(memory_fields(info.device))
    case.close()
    return row


def describe(row: dict) -> str:
    link = f" busbw {row['emulated_busbw_gbs']} GB/s" if row["emulated_busbw_gbs"] else ""
    comm = f"{row['exposed_comm_s']:.3f}" if row["exposed_comm_s"] is not None else "n/a"
    return (f"{row['engine']:>15} {row['method']:>6}{link}: {row['examples_per_s']:8.2f} ex/s "
            f"({row['tokens_per_s_per_gpu']:9.1f} tok/s/GPU)  MFU {100 * row['mfu']:5.1f}%  HFU {100 * row['hfu']:5.1f}%  "
            f"fwd {row['forward_s']:.3f} bwd {row['backward_s']:.3f} comm {comm} opt {row['optimizer_s']:.3f} s  "
            f"{row['bytes_per_update'] / 2**20:8.2f} MiB/update  merge+reset {row['merge_reset_s']:.2f} s")


def speedups(rows: list[dict]) -> list[dict]:
    """ReLoRA over full rank for every (engine, link) measured both ways."""
    out = []
    for (engine, busbw), group in itertools.groupby(sorted(rows, key=lambda r: (r["engine"], r["emulated_busbw_gbs"] or 0)),
                                                   key=lambda r: (r["engine"], r["emulated_busbw_gbs"] or 0)):
        by_method = {r["method"]: r for r in group}
        if {"full", "relora"} <= by_method.keys():
            ratio = by_method["relora"]["examples_per_s"] / by_method["full"]["examples_per_s"]
            out.append({"engine": engine, "emulated_busbw_gbs": busbw or None, "speedup": ratio,
                        "full_update_s": by_method["full"]["update_s"], "relora_update_s": by_method["relora"]["update_s"]})
    return out


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']}\n{r['method']}" + (f"\n{r['emulated_busbw_gbs']} GB/s" if r["emulated_busbw_gbs"] else "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.5))
    left.bar(labels, [r["tokens_per_s_per_gpu"] for r in rows], color=["#4c72b0" if r["method"] == "full" else "#dd8452" for r in rows])
    left.set_ylabel("tokens/s per GPU")
    bottom = [0.0] * len(rows)
    for phase, key in (("forward", "forward_s"), ("backward", "backward_s"), ("exposed comm", "exposed_comm_s"), ("optimizer", "optimizer_s")):
        values = [r[key] or 0.0 for r in rows]
        if phase == "backward":  # exposed comm is measured inside fwd+bwd: show backward without it
            values = [v - (r["exposed_comm_s"] or 0.0) for v, r in zip(values, rows)]
        right.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("seconds per update (median)")
    right.legend()
    fig.suptitle(f"{rows[0]['preset']}, {rows[0]['dtype']}, {rows[0]['world_size']} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc and "RANK" not in os.environ:
        return spawn(args, argv)
    info = init_distributed()
    keep_host_memory(info.device)
    peak = (args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops else device_peak_flops(info.device, args.dtype)
    if peak[0] is None:
        raise ValueError(f"no peak FLOP/s known for {torch.cuda.get_device_name(info.device)}; pass --peak-tflops")
    rows = []
    links = [float(x) for x in args.emulate_busbw.split(",")] if args.emulate_busbw else [0.0]
    pairs, skipped = cases(args.methods.split(","), args.engines.split(","))
    if info.rank == 0:
        for note in skipped:
            print(f"skipped {note}", flush=True)
    for engine, busbw in itertools.product(dict.fromkeys(e for e, _ in pairs), links):
        methods = [m for e, m in pairs if e == engine]
        groups = [methods] if args.interleave else [[method] for method in methods]
        measured = [row for group in groups for row in run_cases(args, info, group, engine, busbw, peak)]
        rows.extend(measured)
        if info.rank == 0:
            for row in measured:
                print(describe(row), flush=True)
    if info.rank == 0:
        ratios = speedups(rows)
        for s in ratios:
            link = f" at {s['emulated_busbw_gbs']} GB/s" if s["emulated_busbw_gbs"] else ""
            print(f"ReLoRA speedup on {s['engine']}{link}: {100 * (s['speedup'] - 1):+.1f}%")
        write_results(rows, args.out, extra={"speedups": ratios, "argv": argv}, plot=plot if args.plot else None)
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
