"""What our training loop costs per update against a plain, hand-written DDP loop on the same model and batches.

    python benchmarks/loop_overhead.py                      # the issue's configuration: 9m, vocab 4096, 2 gloo ranks
    python benchmarks/loop_overhead.py --repeats 3 --updates 120 --warm-start-steps 40 --merge-every 40

Both sides run under torchrun with one CPU thread per rank:

- **ours**: our trainer as `launch/train.py` runs it (`--method relora`: a full-rank warm start, then ReLoRA), so
  logging, LR schedule, finiteness checks and the method's hooks are inside every update's interval;
- **bare**: the same model (built by the same method, so the ReLoRA phase has the same LoRA layers), the same data
  and global batches (`SequenceSampler`), DDP, forward, backward, clip, AdamW step, zero_grad; nothing else.

`--mode interleaved` (the default) runs both in one job: after each of our updates the bare loop takes the same
update on its own copy of the model, so a box whose speed drifts slows both alike. `--mode separate` runs them as
separate jobs, alternately (ours from the `wall_s` of consecutive metrics.jsonl records).

Intervals that hold a merge, a warm-start switch or an evaluation, and the first `--skip` of each phase, are left
out; the figure is the median per-update time of each phase. Ratio = bare time / ours time (>= 1: we are as fast),
twice: of the medians over repeats, and the median of each repeat's own ratio.
"""

from __future__ import annotations

import argparse
import contextlib
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
MODES = ("interleaved", "separate")


def _run_args(args) -> list[str]:
    return [*TRAIN_ARGS, "--method", "relora", "--steps", str(args.updates), "--warm-start-steps", str(args.warm_start_steps),
            "--merge-every", str(args.merge_every), "--seed", str(args.seed)]


# -- the bare loop (one rank) ---------------------------------------------------------------------------------------
class BareLoop:
    """Full rank for the warm start, then the method's low-rank model for the rest, in the plainest DDP loop."""

    def __init__(self, cfg, method, data, *, rank: int, world_size: int):
        import torch

        from relora_dist.models import llama_config

        self.cfg, self.method, self.data, self.rank, self.world_size = cfg, method, data, rank, world_size
        t = cfg.train
        config = method.model_config(llama_config(cfg.model.preset, vocab_size=len(data.tokenizer)))
        with torch.random.fork_rng(devices=[]):  # beside our trainer: leave its dropout streams alone
            torch.manual_seed(t.seed)
            self.module = method.build_model(config)
        self.phase_starts = {first for first, _ in method.phases()}  # the model structure of each phase, no events

    def _setup(self, step: int) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from relora_dist.backends.ddp import no_buffer_broadcast

        o = self.cfg.optim
        self.module = self.method.prepare_model(self.module, step)
        self.model = DistributedDataParallel(self.module, **no_buffer_broadcast())  # rotary buffers are equal everywhere, as ours
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)

    def update(self, step: int) -> None:
        """One optimizer update on the global batch of update `step` (0-based)."""
        import torch

        if step in self.phase_starts:
            self._setup(step)
        t = self.cfg.train
        micro = self.data.sampler.local_microbatches(step, rank=self.rank, world_size=self.world_size,
                                                     micro_batch_size=t.micro_batch_size)
        for i, pairs in enumerate(micro):
            batch = self.data.read(pairs)
            with self.model.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
                self.model(input_ids=batch, labels=batch, use_cache=False).loss.backward()  # as ours
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def separate_worker(argv: list[str], times_path: str) -> None:
    """The bare loop alone; writes its per-update intervals."""
    import torch.distributed as dist

    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.preflight import preflight
    from relora_dist.train.trainer import build_run_data

    cfg, _ = parse_run_config(argv)
    method = preflight(cfg).method
    dist.init_process_group("gloo")
    bare = BareLoop(cfg, method, build_run_data(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
    intervals, last = [], time.perf_counter()
    for step in range(cfg.train.steps):
        bare.update(step)
        now = time.perf_counter()
        intervals.append(now - last)
        last = now
    if dist.get_rank() == 0:
        Path(times_path).write_text(json.dumps({"bare": intervals}))
    dist.destroy_process_group()


def interleaved_worker(argv: list[str], times_path: str) -> None:
    """Our trainer, with the bare loop taking the same update right after each of ours; writes both sides' intervals."""
    from relora_dist.distributed import close_distributed
    from relora_dist.methods import build_method
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.trainer import Trainer

    cfg, _ = parse_run_config(argv)
    trainer = Trainer(cfg)  # preflight checked cfg; the bare loop gets a method instance of its own
    bare = BareLoop(cfg, build_method(cfg), trainer.data, rank=trainer.dist.rank, world_size=trainer.dist.world_size)
    times = {"ours": [], "bare": []}
    last = [time.perf_counter()]

    def bare_update(step: int) -> None:  # ours' interval: from the end of the previous bare update to here
        entered = time.perf_counter()
        bare.update(step - 1)
        done = time.perf_counter()
        times["ours"].append(entered - last[0])
        times["bare"].append(done - entered)
        last[0] = done

    trainer.train(on_update=bare_update)
    if trainer.is_main:
        Path(times_path).write_text(json.dumps(times))
    close_distributed()


# -- the driver ---------------------------------------------------------------------------------------------------------
def _torchrun(nproc: int, threads: int, script: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(torchrun_command(nproc, *script), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def _worker(args, work: Path, mode: str, extra: list[str] = ()) -> dict[str, list[float]]:
    path = work / f"{mode}.json"
    _torchrun(args.nproc, args.threads, [__file__, f"--{mode}-worker", str(path), "--", *_run_args(args), *extra])
    return json.loads(path.read_text())


def _ours_alone(args, work: Path) -> dict[str, list[float]]:
    out = work / "ours"
    _torchrun(args.nproc, args.threads, ["launch/train.py", *_run_args(args), "--out", str(out), "--overwrite", "true"])
    stamps = [json.loads(line)["wall_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ours": [b - a for a, b in zip([0.0, *stamps], stamps)]}


def runs_of_one_repeat(args, work: Path):
    """(side, its per-update intervals) for one repeat, in the order they were measured."""
    if args.mode == "interleaved":
        yield from _worker(args, work, "interleaved", ["--out", str(work / "ours"), "--overwrite", "true"]).items()
    else:
        yield from _ours_alone(args, work).items()
        yield from _worker(args, work, "separate").items()


def phase_median(intervals: list[float], *, first: int, last: int, skip: int, excluded: set[int]) -> float:
    """Median seconds of updates first+skip..last-1 (intervals[k - 1] is 1-based update k's)."""
    return statistics.median(intervals[k - 1] for k in range(first + 1 + skip, last + 1) if k not in excluded)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="interleaved",
                   help="interleaved: both loops in one job, update by update; separate: alternate whole jobs")
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--warm-start-steps", type=int, default=50)
    p.add_argument("--merge-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side; medians pooled over them")
    p.add_argument("--skip", type=int, default=3, help="updates left out at the start of each phase (allocator warm-up)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/loop_overhead.json"))
    p.add_argument("--separate-worker", metavar="TIMES_JSON", help=argparse.SUPPRESS)
    p.add_argument("--interleaved-worker", metavar="TIMES_JSON", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    worker_args = [a for a in rest if a != "--"]
    if args.separate_worker:
        separate_worker(worker_args, args.separate_worker)
        return 0
    if args.interleaved_worker:
        interleaved_worker(worker_args, args.interleaved_worker)
        return 0
    # Ours logs update k after k's events (the warm-start switch, merges); the bare loop sets up the next phase
    # before its first update: leave out both intervals around every event.
    events = {args.warm_start_steps} | set(range(args.warm_start_steps + args.merge_every, args.updates + 1, args.merge_every))
    excluded = events | {k + 1 for k in events}
    phases = {"full_rank": (0, args.warm_start_steps), "relora": (args.warm_start_steps, args.updates)}
    samples: dict[str, dict[str, list[float]]] = {side: {ph: [] for ph in phases} for side in ("ours", "bare")}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            started = time.perf_counter()
            for side, intervals in runs_of_one_repeat(args, Path(tmp)):
                for ph, (first, last) in phases.items():
                    samples[side][ph].append(phase_median(intervals, first=first, last=last, skip=args.skip, excluded=excluded))
                print(f"repeat {repeat + 1}/{args.repeats} {side}: "
                      + ", ".join(f"{ph} {samples[side][ph][-1] * 1e3:.1f} ms/update" for ph in phases), flush=True)
            print(f"repeat {repeat + 1}/{args.repeats}: {time.perf_counter() - started:.0f} s", flush=True)
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
    write_results(rows, args.json, extra={"config": {"mode": args.mode, "train_args": _run_args(args), "nproc": args.nproc,
                                                      "threads": args.threads, "repeats": args.repeats, "skip": args.skip}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
