"""relora-compare: every registered method at one token budget, on the same batches, each at the best learning rate
of a sweep that widens until that rate is bracketed; the paper's method table and ablation beside ours.

    relora-compare                                   # preset cpu: 9m, builtin:stdlib-source, 1.64M tokens a run
    relora-compare --methods relora,relora@factors --lrs 0.002,0.004     # one chunk; finished runs are reused
    relora-compare --smoke --out /tmp/c              # the whole pipeline in about a minute (CI)
    relora-compare --preset gpu_60m --dataset c4 ... # the paper's 60M setting (anything unknown goes to relora-train)

Rows (--methods): one per registered method (the paper's LR recipe: once low rank, everything at --lora-lr =
2 x --lr); `<method>@factors` for each low-rank one (--lora-lr-scope factors: only the low-rank factors at 2 x;
embeddings, head and norms keep --lr); the ablation rows R, R+O, R+J, R+O+J (ReLoRA from scratch with only those
mechanisms); full@np4 (full rank with embeddings, head and norms at 4x the rate: the freedom GaLore, Fira and
SwitchLoRA's recipes give them); relora_shared / relora_bits16 (LoRA input variants) and galore@right / fira@right
(the named variant --galore-proj right: down_proj projected from the right too) on request, and <row>@np<k> for any
row (--non-projection-lr-scale k). A new method gets its rows by being registered.

Protocol: every run trains the preset's updates x global batch x sequence (checked: equal tokens everywhere), one
process and one thread each, --jobs at a time. Seed 0 sweeps the preset's LRs; a row whose best LR is the lowest or
highest tried gets the next one out (x/2, x2) until it is bracketed (a diverged neighbour brackets too) or
--max-widen rounds pass. The --top rows by val loss then repeat their best LR with the other --seeds: the table
gives the mean and the spread (max - min) of their validation perplexity. Per row also: trainable parameters, Adam
state bytes (read from the final checkpoint), peak RSS, tokens/s of the single-process run, and from one
`relora-bench` run per method on 2 DDP ranks: bytes sent per update and tokens/s per rank.

Resumable: each run's result is cached in its run directory (OUT/runs/<row>_lr<lr>_s<seed>/compare_record.json),
so a stopped comparison continues where it stopped and chunks add up; the table always covers every finished run
of the selected rows. The CPU time still to spend is estimated (from finished runs, else a short probe) and printed
before any training. Results: OUT/compare.json, OUT/compare.md, OUT/val_loss.png, OUT/lr_sweep.png, OUT/ppl.png,
OUT/spectrum.png (W_final - W_warm_start of full rank, LoRA + WS and ReLoRA, paper Figure 5), OUT/bench.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from relora_dist.benchmarks.compare_report import markdown, orderings, plot_lr_sweep, plot_perplexities, plot_val_curves
from relora_dist.methods import method_class, method_names
from relora_dist.train.config import flag_for

RECORD = "compare_record.json"  # written into a run's directory when it is done
FACTORS = "@factors"  # row suffix: the same method with --lora-lr-scope factors
NON_PROJECTION = "@np"  # row suffix: <row>@np<k>, that row with --non-projection-lr-scale k
OFF = {"restarts": False, "optimizer_reset": False, "jagged_schedule": False}


@dataclass(frozen=True)
class Row:
    method: str
    relora: dict = field(default_factory=dict)  # relora: section switches (the ablations, the LoRA input variants)
    lora_lr_scope: str = "all"
    default: bool = True  # in the default --methods
    settings: dict = field(default_factory=dict)  # the method's own config section (a named deviation's A/B)
    non_projection_lr_scale: float = 1.0  # embeddings, head and norms at this multiple of the row's rate


def factors_scoped(method: str) -> bool:
    """Low-rank methods of the ReLoRA family, whose A and B take --lora-lr when --lora-lr-scope factors."""
    cls = method_class(method)
    return cls.cost_traits.adapters and cls.config_section == "relora"


def rows() -> dict[str, Row]:
    """Every registered method (the paper's recipe), its @factors twin if it is low rank, the ablation rows and the
    LoRA input variants (not run by default: they change speed, not the method)."""
    out = {name: Row(name) for name in method_names()}
    out |= {name + FACTORS: Row(name, lora_lr_scope="factors") for name in method_names()
            if factors_scoped(name)}
    out |= {
        "R": Row("relora", {**OFF, "restarts": True, "warm_start_steps": 0}),
        "R+O": Row("relora", {**OFF, "restarts": True, "optimizer_reset": True, "warm_start_steps": 0}),
        "R+J": Row("relora", {**OFF, "restarts": True, "jagged_schedule": True, "warm_start_steps": 0}),
        "R+O+J": Row("relora", {"warm_start_steps": 0}),
        "relora_shared": Row("relora", {"shared_lora_input": True}, default=False),
        "relora_bits16": Row("relora", {"dropout_mask": "bits16"}, default=False),
        # --galore-proj right, the named variant that needs no per-step collective on the engines that split rows
        "galore@right": Row("galore", default=False, settings={"proj": "right"}),
        "fira@right": Row("fira", default=False, settings={"proj": "right"}),
        # full rank with the embeddings, head and norms at 4x: the rate GaLore, Fira and SwitchLoRA give them at
        # their best LR, where their projections move at about full rank's best
        "full@np4": Row("full", non_projection_lr_scale=4.0),
    }
    return out


def row(name: str) -> Row:
    """The row `name`: one of `rows()`, or `<row>@np<k>` for any of them (KeyError otherwise)."""
    every = rows()
    if name in every:
        return every[name]
    base, _, scale = name.rpartition(NON_PROJECTION)
    try:
        value = float(scale)
    except ValueError:
        value = 0.0
    if base not in every or not value > 0:
        raise KeyError(name)
    return replace(every[base], default=False, non_projection_lr_scale=value)


@dataclass
class Preset:
    model: str
    steps: int
    warm_start: int
    merge_every: int
    restart_warmup: int
    warmup: int
    rank: int
    global_batch: int
    micro_batch: int
    seq_len: int
    lrs: list[float]  # the first sweep round's full-rank LRs; low-rank phases use 2x (--lora-lr)
    eval_every: int
    data: list[str] = field(default_factory=list)  # relora-train's data flags
    extra: list[str] = field(default_factory=list)
    max_widen: int = 4  # sweep rounds that may add an LR beyond the current ends
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    top: int = 6  # rows that repeat their best LR with the other seeds

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_len


PRESETS = {
    # The CI pipeline check: the debug model on the default corpus, one LR, no widening, the top 2 rows on 2 seeds.
    "smoke": Preset("debug", 24, 6, 6, 2, 2, 4, 8, 8, 32, [2e-3], 6, ["--vocab-size", "512"], max_widen=0, top=2),
    # 9m (h128, 4 layers) at vocab 2048: the projections hold 60% of the 1.33M parameters (tiny at vocab 4096: 30%).
    # 800 x 16 x 128 = 1.64M tokens, 0.47 epoch of builtin:stdlib-source's 3.48M training tokens at that vocab.
    # About 3-3.5 min a run on one core of the 2-core box; the default rows, 3 LRs, a few widenings and the second
    # seed of the top 6 come to about 50 runs: about 2 hours with --jobs 2.
    "cpu": Preset("9m", 800, 200, 150, 15, 40, 32, 16, 16, 128, [5e-4, 1e-3, 2e-3], 100,
                  ["--dataset", "builtin:stdlib-source", "--vocab-size", "2048"]),
    # The earlier quality preset (tiny on the embedded docs corpus: 70% embeddings and head; 2.2 epochs).
    "tiny_docs": Preset("tiny", 800, 200, 150, 15, 40, 32, 16, 8, 128, [1e-3, 2e-3], 100, max_widen=0, seeds=[0], top=0),
    # The paper's 60M / 130M settings (SPEC sections 5-6): batch 1152 x 512, r 128, a quarter of the run as warm
    # start, 1.2B / 2.6B tokens (the token counts quoted for those sizes; the exact step counts are unreported).
    "gpu_60m": Preset("60m", 2000, 500, 500, 50, 100, 128, 1152, 96, 512, [5e-4, 1e-3], 250, extra=["--dtype", "bf16"]),
    "gpu_130m": Preset("130m", 4400, 1100, 1100, 100, 220, 128, 1152, 64, 512, [5e-4, 1e-3], 550, extra=["--dtype", "bf16"]),
}


def run_arguments(name: str, lr: float, seed: int, preset: Preset, out: Path) -> list[str]:
    spec, p = row(name), preset
    args = ["--model", p.model, "--method", spec.method, "--steps", p.steps, "--global-batch-size", p.global_batch,
            "--micro-batch-size", p.micro_batch, "--seq-len", p.seq_len, "--lr", lr, "--lora-lr", 2 * lr,
            "--lora-lr-scope", spec.lora_lr_scope, "--seed", seed,
            "--warmup-steps", p.warmup, "--rank", p.rank, "--lora-alpha", p.rank, "--merge-every", p.merge_every,
            "--restart-warmup-steps", p.restart_warmup, "--warm-start-steps", spec.relora.get("warm_start_steps", p.warm_start),
            "--eval-every", p.eval_every, "--save-every", p.warm_start, "--keep-checkpoints", 1000,
            "--out", out, "--overwrite", "true", "--progress", "false", *p.data, *p.extra]
    for switch, value in spec.relora.items():  # the ablation switches, the LoRA input variants (relora section)
        if switch != "warm_start_steps":
            args += [f"--{flag_for('relora', switch)}", str(value).lower()]
    for key, value in spec.settings.items():
        args += [f"--{flag_for(method_class(spec.method).config_section, key)}", str(value)]
    if spec.non_projection_lr_scale != 1.0:
        args += ["--non-projection-lr-scale", spec.non_projection_lr_scale]
    return [str(a) for a in args]


def run_directory(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{name}_lr{lr:g}_s{seed}"


def cached(out: Path, name: str, lr: float, seed: int) -> dict | None:
    path = run_directory(out, name, lr, seed) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def train(job: tuple[str, float, int], preset: Preset, out: Path, extra: list[str], devices: queue.Queue) -> dict:
    """One relora-train run in its own process (one thread; one GPU of `devices` where there are GPUs); its record."""
    name, lr, seed = job
    known = cached(out, name, lr, seed)
    if known is not None:  # finished in an earlier invocation: sweeps extend without retraining
        return known
    directory = run_directory(out, name, lr, seed)
    command = [sys.executable, "-m", "relora_dist.cli.train", *run_arguments(name, lr, seed, preset, directory), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    device = devices.get()
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        devices.put(device)
    record = {"row": name, "method": row(name).method, "lr": lr, "seed": seed, "out": str(directory),
              "diverged": result.returncode != 0}
    if result.returncode != 0:
        record["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
        if "FloatingPointError" not in result.stderr and "non-finite" not in record["error"]:
            raise RuntimeError(f"{name} lr {lr:g} seed {seed} failed: {result.stderr[-2000:]}")  # a crash, not a divergence
    else:
        record.update(read_run(preset, directory))
    (directory / RECORD).write_text(json.dumps(record))
    return record


def read_run(preset: Preset, directory: Path) -> dict:
    """What the table needs of a finished relora-train run: validation loss and curve, the token count, trainable
    parameters, Adam state bytes, peak RSS, update throughput, wall time."""
    summary = json.loads((directory / "summary.json").read_text())
    records = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    tokens = preset.global_batch * preset.seq_len
    latest = (directory / "checkpoints" / "latest").read_text().strip()
    optimizer = torch.load(directory / "checkpoints" / latest / "optimizer.pt", weights_only=True, map_location="cpu")
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer["state"].values() for k, t in s.items()
                      if isinstance(t, torch.Tensor) and k != "step")
    peak = [r[k] for r in records for k in ("max_rss_gib", "max_memory_allocated_gib") if r.get(k) is not None]
    return {"val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "wall_s": summary["wall_s"],
            "train_tokens": summary["train_tokens"], "trainable_parameters": summary["trainable_parameters"],
            "optimizer_state_bytes": state_bytes, "peak_memory_gib": max(peak) if peak else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "diverged": not math.isfinite(summary["val_loss"]),
            "curve": [(r["step"] * tokens, r["val_loss"]) for r in records if "val_loss" in r]
            + [(preset.steps * tokens, summary["val_loss"])]}


def finished_runs(out: Path, names: list[str]) -> list[dict]:
    """Every finished run of these rows under OUT/runs, whatever invocation or chunk it came from."""
    found = [json.loads(f.read_text()) for f in sorted((out / "runs").glob(f"*/{RECORD}"))]
    return [r for r in found if r["row"] in names]


def loss_of(record: dict) -> float:
    return math.inf if record["diverged"] else record["val_loss"]


def sweep_extension(tried: dict[float, float], *, factor: float = 2.0) -> list[float]:
    """The LRs to add to a row's sweep ({lr: val loss at the sweep seed}, inf for diverged) so that its best LR has a
    tried neighbour on each side: [] once bracketed (a diverged neighbour brackets as well as a worse one)."""
    finite = {lr: loss for lr, loss in tried.items() if math.isfinite(loss)}
    if not finite:
        return [min(tried) / factor]  # everything diverged: go lower
    best = min(finite, key=finite.get)
    ordered = sorted(tried)
    wanted = []
    if best == ordered[0]:
        wanted.append(best / factor)
    if best == ordered[-1]:
        wanted.append(best * factor)
    return wanted


def best_lr(records: list[dict], seed: int) -> dict[str, dict]:
    """Per row, its lowest-val-loss run at the sweep seed (a diverged one if all diverged)."""
    best = {}
    for r in records:
        if r["seed"] == seed and (r["row"] not in best or loss_of(r) < loss_of(best[r["row"]])):
            best[r["row"]] = r
    return best


class Runner:
    """Runs jobs on a pool of --jobs single-threaded processes (GPU i % count for slot i where there are GPUs)."""

    def __init__(self, jobs: int, preset: Preset, out: Path, extra: list[str]):
        self.jobs, self.preset, self.out, self.extra = jobs, preset, out, extra
        self.devices = queue.Queue()
        for slot in range(jobs):
            self.devices.put(slot % torch.cuda.device_count() if torch.cuda.is_available() else None)

    def run(self, jobs: list[tuple[str, float, int]]) -> list[dict]:
        todo = [j for j in jobs if cached(self.out, *j) is None]
        if todo:
            print(f"training {len(todo)} run(s): {', '.join(f'{n} lr {lr:g} seed {s}' for n, lr, s in todo)}", flush=True)
        records = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(train, job, self.preset, self.out, self.extra, self.devices) for job in todo]
            for done in concurrent.futures.as_completed(futures):  # as they finish: progress for long sweeps
                records.append(done.result())
                print(f"[{len(records)}/{len(todo)}] {_line(records[-1])}", flush=True)
        return records


def sweep(runner: Runner, names: list[str], lrs: list[float], seed: int, max_widen: int) -> None:
    """The first round at `lrs` for every row, then widening rounds until every best LR is bracketed."""
    runner.run([(name, lr, seed) for name in names for lr in lrs])
    for _ in range(max_widen):
        tried = {name: {r["lr"]: loss_of(r) for r in finished_runs(runner.out, [name]) if r["seed"] == seed} for name in names}
        jobs = [(name, lr, seed) for name in names for lr in sweep_extension(tried[name])]
        if not jobs:
            return
        runner.run(jobs)


def estimate(runner: Runner, names: list[str], lrs: list[float], preset: Preset, seeds: list[int], top: int) -> str:
    """The CPU time still to spend: runs not yet finished x seconds a run (the median of finished runs of this OUT,
    else a 10-update probe of the first row scaled to the preset's updates, plus its start-up)."""
    done = finished_runs(runner.out, names)
    todo_first = [(n, lr, seeds[0]) for n in names for lr in lrs if cached(runner.out, n, lr, seeds[0]) is None]
    extra_seeds = min(top, len(names)) * (len(seeds) - 1)
    walls = [r["wall_s"] for r in done if not r["diverged"]]
    if walls:
        per_run, basis = statistics.median(walls) + 6.0, f"the median of {len(walls)} finished run(s) + 6 s start-up"
    elif todo_first:
        per_run, basis = probe(runner, todo_first[0][0], lrs[0], preset)
    else:
        per_run, basis = 0.0, "nothing to run"
    widen = 2 * len(names) if preset.max_widen else 0  # usually at most a step out at each end
    low, high = len(todo_first) + extra_seeds, len(todo_first) + extra_seeds + widen
    return (f"estimate: {low}-{high} run(s) to train (first round {len(todo_first)}, widening up to {widen} more, "
            f"{extra_seeds} repeat(s) on the other seeds, fewer where cached); {per_run:.0f} s of one CPU core each "
            f"({basis}): {low * per_run / 60:.0f}-{high * per_run / 60:.0f} min of CPU time, "
            f"{low * per_run / 60 / runner.jobs:.0f}-{high * per_run / 60 / runner.jobs:.0f} min wall with --jobs {runner.jobs}")


def probe(runner: Runner, name: str, lr: float, preset: Preset) -> tuple[float, str]:
    """Seconds one run of the preset takes here, from 10 of its updates (timed whole, start-up included)."""
    directory = runner.out / "runs" / "probe"  # beside the runs (not in git), removed once read
    args = run_arguments(name, lr, 0, preset, directory)
    short = {"--steps": 10, "--eval-every": 0, "--save-every": 0, "--warmup-steps": 2, "--warm-start-steps": 0,
             "--merge-every": 5, "--restart-warmup-steps": 1}
    for flag, value in short.items():
        args[args.index(flag) + 1] = str(value)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relora_dist.cli.train", *args, *runner.extra, "--eval-batches", "1"], check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    whole = time.perf_counter() - start
    summary = json.loads((directory / "summary.json").read_text())
    shutil.rmtree(directory)
    startup = max(0.0, whole - summary["wall_s"])
    per_run = startup + preset.tokens / summary["tokens_per_s"]
    return per_run, f"a 10-update probe of {name}: {summary['tokens_per_s']:.0f} tokens/s, {startup:.0f} s start-up"


def bench_methods(out: Path, preset: Preset, methods: list[str], extra: list[str]) -> dict[str, dict]:
    """Per method, relora-bench's row on 2 DDP ranks at the preset's shape (bytes per update, tokens/s per rank,
    memory); cached in OUT/bench.json, extended for methods it lacks."""
    path = out / "bench.json"
    known = {r["method"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    missing = [m for m in methods if m not in known]
    if missing:
        flags = preset.data + preset.extra
        vocab = flags[flags.index("--vocab-size") + 1] if "--vocab-size" in flags else "4096"
        fresh = out / "bench_new.json"
        command = [sys.executable, "-m", "relora_dist.benchmarks.throughput", "--nproc", "2", "--preset", preset.model,
                   "--vocab-size", vocab, "--seq-len", str(preset.seq_len), "--rank", str(preset.rank),
                   "--methods", ",".join(missing), "--engines", "ddp", "--micro-batch-size", str(preset.micro_batch // 2 or 1),
                   "--accumulation-steps", "1", "--updates", "2", "--merge-every", str(preset.merge_every),
                   "--out", str(fresh)]
        print(f"relora-bench on 2 DDP ranks for {', '.join(missing)}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"relora-bench failed: {result.stderr[-2000:]}")
        known |= {r["method"]: r for r in json.loads(fresh.read_text())["rows"]}
        path.write_text(json.dumps({"rows": list(known.values())}, indent=1))
        for suffix in (".json", ".csv"):
            fresh.with_suffix(suffix).unlink(missing_ok=True)
    return known


def spectra(best: dict[str, dict], preset: Preset, out: Path) -> dict:
    """W_final - W_at_warm_start for full, LoRA + WS and ReLoRA (the same warm-start step for all three)."""
    from relora_dist.analysis.spectrum import plot_spectra, pooled_stats, update_spectra
    from relora_dist.export import merged_weights

    labelled, stats = {}, {}
    for name in ("full", "lora_ws", "relora"):
        r = best.get(name)
        if r is None or r["diverged"]:
            continue
        checkpoints = Path(r["out"]) / "checkpoints"
        before, after = checkpoints / f"step_{preset.warm_start:07d}", checkpoints / f"step_{preset.steps:07d}"
        labelled[name] = update_spectra(merged_weights(after), merged_weights(before))
        stats[name] = pooled_stats(labelled[name])["all"]
    if labelled:
        plot_spectra(labelled, out / "spectrum.png")
    return stats


def summarize(runs: list[dict], names: list[str], seeds: list[int], bench: dict[str, dict]) -> dict[str, dict]:
    """Per row: its sweep, best LR, whether that LR is bracketed, the seeds at it (mean and spread of perplexity),
    and its cost columns."""
    sweep_seed = seeds[0]
    best = best_lr(runs, sweep_seed)
    table = {}
    for name in names:
        if name not in best:
            continue
        b = best[name]
        tried = {r["lr"]: loss_of(r) for r in runs if r["row"] == name and r["seed"] == sweep_seed}
        at_best = [r for r in runs if r["row"] == name and r["lr"] == b["lr"]]
        finite = [r["val_ppl"] for r in at_best if not r["diverged"]]
        cost = bench.get(b["method"], {})
        table[name] = {
            "method": b["method"], "lrs": sorted(tried), "best_lr": b["lr"],
            "recipe": row(name).lora_lr_scope if factors_scoped(b["method"]) else None,
            "bracketed": not b["diverged"] and not sweep_extension(tried), "diverged": b["diverged"],
            "seeds": sorted(r["seed"] for r in at_best), "val_ppl": statistics.mean(finite) if finite else None,
            "val_ppl_spread": max(finite) - min(finite) if len(finite) > 1 else None,
            "val_ppl_range": [min(finite), max(finite)] if finite else None,
            "val_loss": statistics.mean(r["val_loss"] for r in at_best if not r["diverged"]) if finite else None,
            **{k: b.get(k) for k in ("trainable_parameters", "optimizer_state_bytes", "peak_memory_gib", "tokens_per_s",
                                      "wall_s", "train_tokens")},
            "bytes_per_update_2ranks": cost.get("bytes_per_update"), "tokens_per_s_per_rank_2ranks": cost.get("tokens_per_s_per_gpu"),
        }
    return table


def parse(argv):
    p = argparse.ArgumentParser(prog="relora-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--smoke", action="store_true", help="the smoke preset (CI: under 2 minutes)")
    every = rows()
    p.add_argument("--methods", default=None, help=f"comma list of rows (default: {', '.join(n for n, r in every.items() if r.default)};"
                   f" also {', '.join(n for n, r in every.items() if not r.default)})")
    p.add_argument("--lrs", default=None, help="comma list replacing the preset's first-round full-rank LRs")
    p.add_argument("--seeds", default=None, help="comma list; the first one sweeps (default: the preset's)")
    p.add_argument("--top", type=int, default=None, help="rows that repeat their best LR on the other seeds")
    p.add_argument("--max-widen", type=int, default=None, help="sweep rounds that may add an LR beyond the ends")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread or one GPU each)")
    p.add_argument("--bench", default="true", choices=("true", "false"),
                   help="relora-bench each method on 2 DDP ranks (bytes per update, tokens/s per rank)")
    p.add_argument("--estimate-only", action="store_true", help="print the estimate and stop")
    p.add_argument("--report-only", action="store_true", help="train nothing: the table and plots of the finished runs")
    p.add_argument("--out", default=None, help="default benchmarks/results/compare_<preset>; finished runs are reused")
    args, extra = p.parse_known_args(argv)  # anything else goes to relora-train (e.g. --dataset, --tokenizer)
    if args.smoke:
        args.preset = "smoke"
    names = args.methods.split(",") if args.methods else [n for n, r in every.items() if r.default]
    unknown = [n for n in names if not _known(n)]
    if unknown:
        p.error(f"--methods: unknown row(s) {', '.join(unknown)}; choose from {', '.join(every)}, or <row>{NON_PROJECTION}<k>")
    if "--seed" in extra:
        p.error("--seed: use --seeds (the first one sweeps, the others repeat the best LRs)")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    preset = PRESETS[args.preset]
    preset = Preset(**{**asdict(preset),
                       **({"lrs": [float(x) for x in args.lrs.split(",")]} if args.lrs else {}),
                       **({"seeds": [int(x) for x in args.seeds.split(",")]} if args.seeds else {}),
                       **({"top": args.top} if args.top is not None else {}),
                       **({"max_widen": args.max_widen} if args.max_widen is not None else {})})
    return args, extra, names, preset


def _known(name: str) -> bool:
    try:
        row(name)
    except KeyError:
        return False
    return True


def main(argv=None) -> int:
    args, extra, names, preset = parse(argv)
    out = Path(args.out or f"benchmarks/results/compare_{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.jobs, preset, out, extra)
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.trainer import build_run_data

    # Every row's command is a valid config, and the data is packed once here (parallel runs only read the cache).
    configs = [parse_run_config(run_arguments(name, preset.lrs[0], preset.seeds[0], preset, out / "runs" / "cache") + extra)[0]
               for name in names]
    build_run_data(configs[0])
    print(f"preset {args.preset}: {preset.model}, {preset.steps} updates x {preset.global_batch} x {preset.seq_len} = "
          f"{preset.tokens / 1e6:.2f}M tokens a run; rows {', '.join(names)}", flush=True)
    if not args.report_only:
        print(estimate(runner, names, preset.lrs, preset, preset.seeds, preset.top), flush=True)
    if args.estimate_only:
        return 0
    if not args.report_only:
        sweep(runner, names, preset.lrs, preset.seeds[0], preset.max_widen)
        best = best_lr(finished_runs(out, names), preset.seeds[0])
        ranked = sorted((n for n in names if n in best and not best[n]["diverged"]), key=lambda n: best[n]["val_loss"])
        runner.run([(n, best[n]["lr"], s) for n in ranked[:preset.top] for s in preset.seeds[1:]])
    best = best_lr(finished_runs(out, names), preset.seeds[0])

    runs = finished_runs(out, names)
    tokens = {r["train_tokens"] for r in runs if not r["diverged"]}
    if len(tokens) > 1:
        raise RuntimeError(f"runs trained different token counts {sorted(tokens)}: not one budget")
    bench = bench_methods(out, preset, sorted({row(n).method for n in names}), extra) if args.bench == "true" else {}
    table = summarize(runs, names, preset.seeds, bench)
    checks = orderings(table)
    from relora_dist.benchmarks.common import machine

    m = machine()
    spectrum = spectra(best, preset, out)
    report = {"machine": m, "preset": args.preset, "settings": asdict(preset), "tokens_per_run": preset.tokens,
              "rows": table, "runs": runs, "orderings": checks, "spectrum": spectrum}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(markdown(report))
    plot_val_curves(best, out / "val_loss.png")
    plot_lr_sweep(runs, preset.seeds[0], out / "lr_sweep.png")
    plot_perplexities(table, out / "ppl.png")
    print((out / "compare.md").read_text())
    print(f"wrote {out}/compare.json, compare.md, val_loss.png, lr_sweep.png, ppl.png" + (", spectrum.png" if spectrum else ""))
    return 0


def _line(r: dict) -> str:
    if r["diverged"]:
        return f"{r['row']:>14} lr {r['lr']:g} seed {r['seed']}: diverged ({r.get('error', 'non-finite loss')})"
    return (f"{r['row']:>14} lr {r['lr']:g} seed {r['seed']}: val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f}) "
            f"in {r['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
