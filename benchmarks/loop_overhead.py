"""What our training loop costs per update against a plain, hand-written DDP loop on the same model and batches.

    python benchmarks/loop_overhead.py                      # the issue's configuration: 9m, vocab 4096, 2 gloo ranks
    python benchmarks/loop_overhead.py --repeats 3 --updates 120 --warm-start-steps 40 --merge-every 40

Both sides run under torchrun with one CPU thread per rank, alternately (ours, bare, ours, bare, ...):

- **ours**: `launch/train.py` as a user runs it (`--method relora`: a full-rank warm start, then ReLoRA), per-update
  times from the `wall_s` of consecutive metrics.jsonl records, so logging, LR schedule, finiteness checks and the
  method's hooks are inside the interval;
- **bare**: the same model (built by the same method, so the ReLoRA phase has the same LoRA layers), the same data
  and global batches (`GlobalBatchPlan`), DDP, forward, backward, clip, AdamW step, zero_grad; nothing else.

Intervals that hold a merge, a warm-start switch or an evaluation, and the first `--skip` of each phase, are left
out; the figure is the median per-update time of each phase. Ratio = bare time / ours time (>= 1: we are as fast),
twice: of the medians over repeats, and the median of each repeat's own ratio (its two runs are neighbours in time,
so a box that drifts between repeats moves both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relora_dist.benchmarks.common import torchrun_command, write_results

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ("--model 9m --vocab-size 4096 --seq-len 128 --global-batch-size 16 --micro-batch-size 8 --dtype fp32 "
              "--rank 32 --lora-dropout 0.1 --lr 1e-3 --grad-clip 1.0 --eval-every 0 --eval-batches 1 --save-every 0 "
              "--progress false").split()


def _run_args(args) -> list[str]:
    return [*TRAIN_ARGS, "--method", "relora", "--steps", str(args.updates), "--warm-start-steps", str(args.warm_start_steps),
            "--merge-every", str(args.merge_every), "--seed", str(args.seed)]


# -- the bare loop (one rank) ---------------------------------------------------------------------------------------
def bare_worker(argv: list[str], times_path: str) -> None:
    """Full rank for the warm start, then the method's low-rank model for the rest, in the plainest DDP loop."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from relora_dist.backends.ddp import no_buffer_broadcast
    from relora_dist.data import GlobalBatchPlan
    from relora_dist.models import llama_config
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.preflight import preflight
    from relora_dist.train.trainer import build_run_data

    cfg, _ = parse_run_config(argv)
    method = preflight(cfg).method
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    data = build_run_data(cfg)
    plan = GlobalBatchPlan(len(data.train), t.global_batch_size, t.seed)
    config = method.model_config(llama_config(cfg.model.preset, vocab_size=len(data.tokenizer)))
    torch.manual_seed(t.seed)
    module = method.build_model(config)
    stamps: list[float] = []

    def train(module, first: int, last: int) -> None:
        model = DistributedDataParallel(module, **no_buffer_broadcast())  # rotary buffers are equal everywhere, as ours
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay)
        for step in range(first, last):
            for indices in plan.local_microbatches(step, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size):
                batch = data.train[indices]
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()  # as ours
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    for first, last in method.phases():  # the method's model structure of each phase, no events inside
        module = method.prepare_model(module, first)
        train(module, first, last)
    if rank == 0:
        Path(times_path).write_text(json.dumps([s - start for s in stamps]))
    dist.destroy_process_group()


# -- the driver ---------------------------------------------------------------------------------------------------------
def _torchrun(nproc: int, threads: int, script: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(torchrun_command(nproc, *script), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def _ours(args, work: Path) -> list[float]:
    out = work / "ours"
    _torchrun(args.nproc, args.threads, ["launch/train.py", *_run_args(args), "--out", str(out), "--overwrite", "true"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["wall_s"] for r in records]


def _bare(args, work: Path) -> list[float]:
    path = work / "bare.json"
    _torchrun(args.nproc, args.threads, [__file__, "--bare-worker", str(path), "--", *_run_args(args)])
    return json.loads(path.read_text())


def phase_median(stamps: list[float], *, first: int, last: int, skip: int, excluded: set[int]) -> float:
    """Median seconds of updates first+skip..last-1 (1-based update k runs from stamp k-1 to stamp k)."""
    intervals = [stamps[k - 1] - stamps[k - 2] for k in range(first + 1 + skip, last + 1) if k >= 2 and k not in excluded]
    return statistics.median(intervals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--warm-start-steps", type=int, default=50)
    p.add_argument("--merge-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; medians pooled over them")
    p.add_argument("--skip", type=int, default=3, help="updates left out at the start of each phase (allocator warm-up)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/loop_overhead.json"))
    p.add_argument("--bare-worker", metavar="TIMES_JSON", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.bare_worker:
        bare_worker([a for a in rest if a != "--"], args.bare_worker)
        return 0
    # Ours logs update k after k's events (the warm-start switch, merges); the bare loop sets up the next phase
    # before its first update: leave out both intervals around every event.
    events = {args.warm_start_steps} | set(range(args.warm_start_steps + args.merge_every, args.updates + 1, args.merge_every))
    excluded = events | {k + 1 for k in events}
    phases = {"full_rank": (0, args.warm_start_steps), "relora": (args.warm_start_steps, args.updates)}
    samples: dict[str, dict[str, list[float]]] = {side: {ph: [] for ph in phases} for side in ("ours", "bare")}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for side, run in (("ours", _ours), ("bare", _bare)):
                started = time.perf_counter()
                stamps = run(args, Path(tmp))
                for ph, (first, last) in phases.items():
                    samples[side][ph].append(phase_median(stamps, first=first, last=last, skip=args.skip, excluded=excluded))
                print(f"repeat {repeat + 1}/{args.repeats} {side}: "
                      + ", ".join(f"{ph} {samples[side][ph][-1] * 1e3:.1f} ms/update" for ph in phases)
                      + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    examples = int(TRAIN_ARGS[TRAIN_ARGS.index("--global-batch-size") + 1])
    for ph in phases:
        ours, bare = statistics.median(samples["ours"][ph]), statistics.median(samples["bare"][ph])
        paired = [b / o for o, b in zip(samples["ours"][ph], samples["bare"][ph], strict=True)]
        rows.append({"phase": ph, "ours_ms": ours * 1e3, "bare_ms": bare * 1e3, "ratio_bare_over_ours": bare / ours,
                     "paired_ratios": paired, "paired_ratio_median": statistics.median(paired),
                     "ours_examples_per_s": examples / ours, "bare_examples_per_s": examples / bare,
                     "ours_samples_ms": [s * 1e3 for s in samples["ours"][ph]],
                     "bare_samples_ms": [s * 1e3 for s in samples["bare"][ph]]})
        print(f"{ph:>10}: ours {ours * 1e3:7.1f} ms  bare {bare * 1e3:7.1f} ms  ratio {bare / ours:.3f}x"
              f"  paired {statistics.median(paired):.3f}x")
    write_results(rows, args.json, extra={"config": {"train_args": _run_args(args), "nproc": args.nproc,
                                                      "threads": args.threads, "repeats": args.repeats, "skip": args.skip}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
