"""Training quality at small scale: the paper's method comparison and its ablation (Table 1), same token budget
for every row, a small learning-rate sweep per row, validation curves, and the update spectra (Figure 5).

    python benchmarks/quality.py --preset cpu        # about 50 min on 2 cores (20 runs), the embedded corpus
    python benchmarks/quality.py --preset gpu_60m --data-dataset c4 ...   # the paper's 60M / 130M settings
    python benchmarks/quality.py --preset smoke --out /tmp/q           # the pipeline in a minute (the tests)

Rows: full rank; Control (a full-rank model as large as what ReLoRA trains); LoRA; LoRA + warm start (W);
ReLoRA (all four mechanisms); and the ablation without warm start: restarts (R), R + optimizer reset (O),
R + jagged schedule (J), R + O + J; and ReLoRA with a shared LoRA input (relora_shared: one dropout mask per
q/k/v and gate/up group). Each row trains the same number of updates of the same global batch; the
lowest final validation loss over its learning rates is reported, beside the paper's perplexities (130M
ablation, 60M/130M method table). Which of the paper's orderings reproduce is computed, not asserted.
Results: OUT/quality.json, OUT/quality.md, OUT/val_loss.png, OUT/spectrum.png (W_final - W_warm_start of
full rank, LoRA + WS and ReLoRA at their best learning rates).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import queue
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relora_dist.methods import method_names
from relora_dist.train.config import flag_for

# name: (method, overrides): one row per registered method, then the ablation rows, which start ReLoRA from
# scratch with the named mechanisms on.
OFF = {"restarts": False, "optimizer_reset": False, "jagged_schedule": False}
ROWS: dict[str, tuple[str, dict]] = {name: (name, {}) for name in method_names()} | {
    "R": ("relora", {**OFF, "restarts": True, "warm_start_steps": 0}),
    "R+O": ("relora", {**OFF, "restarts": True, "optimizer_reset": True, "warm_start_steps": 0}),
    "R+J": ("relora", {**OFF, "restarts": True, "jagged_schedule": True, "warm_start_steps": 0}),
    "R+O+J": ("relora", {"warm_start_steps": 0}),
    # ReLoRA with one LoRA dropout mask and down-projection GEMM per q/k/v and gate/up group (--shared-lora-input)
    "relora_shared": ("relora", {"shared_lora_input": True}),
    # ReLoRA with the LoRA dropout mask cut from 16 random bits an element (--lora-dropout-mask bits16)
    "relora_bits16": ("relora", {"dropout_mask": "bits16"}),
}
RECORD = "quality_record.json"  # written into a run's directory when it is done

# The paper's perplexities (SPEC section 6): method table at 60M and 130M, ablation at 130M (None: diverged).
PAPER = {
    "full": {"60m": 33.81, "130m": 23.65}, "control": {"60m": 36.52, "130m": 27.30}, "lora": {"60m": 47.44, "130m": 34.17},
    "lora_ws": {"60m": 34.73, "130m": 25.46}, "relora": {"60m": 34.46, "130m": 25.04},
    "R": {"130m": 34.25}, "R+O": {"130m": None}, "R+J": {"130m": 34.29}, "R+O+J": {"130m": 29.77},
}
# (better, worse) pairs the paper's 130M numbers order; "R+O diverged" is checked separately.
PAPER_ORDERINGS = [("full", "relora"), ("relora", "lora_ws"), ("lora_ws", "control"), ("control", "lora"),
                   ("relora", "R+O+J"), ("R+O+J", "R"), ("R+O+J", "R+J"), ("lora_ws", "lora")]


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
    lrs: list[float]  # full-rank LR; low-rank phases use 2x (the paper's recipe)
    eval_every: int
    extra: list[str] = field(default_factory=list)


PRESETS = {
    "smoke": Preset("debug", 24, 6, 6, 2, 2, 4, 8, 4, 32, [2e-3], 6, ["--vocab-size", "512"]),
    "cpu": Preset("tiny", 800, 200, 150, 15, 40, 32, 16, 8, 128, [1e-3, 2e-3], 100),
    # The paper's 60M / 130M settings (SPEC sections 5-6): batch 1152 x 512, r 128, a quarter of the run as warm
    # start, 1.2B / 2.6B tokens (the token counts quoted for those sizes; the exact step counts are unreported).
    "gpu_60m": Preset("60m", 2000, 500, 500, 50, 100, 128, 1152, 96, 512, [5e-4, 1e-3], 250, ["--dtype", "bf16"]),
    "gpu_130m": Preset("130m", 4400, 1100, 1100, 100, 220, 128, 1152, 64, 512, [5e-4, 1e-3], 550, ["--dtype", "bf16"]),
}


def run_arguments(name: str, lr: float, preset: Preset, out: Path) -> list[str]:
    method, overrides = ROWS[name]
    p = preset
    args = ["--model", p.model, "--method", method, "--steps", p.steps, "--global-batch-size", p.global_batch,
            "--micro-batch-size", p.micro_batch, "--seq-len", p.seq_len, "--lr", lr, "--lora-lr", 2 * lr,
            "--warmup-steps", p.warmup, "--rank", p.rank, "--lora-alpha", p.rank, "--merge-every", p.merge_every,
            "--restart-warmup-steps", p.restart_warmup, "--warm-start-steps", overrides.get("warm_start_steps", p.warm_start),
            "--eval-every", p.eval_every, "--save-every", p.warm_start, "--keep-checkpoints", 1000,
            "--out", out, "--overwrite", "true", "--progress", "false", *p.extra]
    for switch, value in overrides.items():  # the ablation switches, the LoRA input variants (relora section)
        if switch != "warm_start_steps":
            args += [f"--{flag_for('relora', switch)}", str(value).lower()]
    return [str(a) for a in args]


def train(name: str, lr: float, preset: Preset, out: Path, extra: list[str], devices: queue.Queue | None = None) -> dict:
    """One relora-train run in its own process (one thread; one GPU of `devices` where there are GPUs);
    its final and per-eval validation losses."""
    directory = out / "runs" / f"{name}_lr{lr:g}"
    if (directory / RECORD).exists():  # finished in an earlier invocation: sweeps extend without retraining
        return json.loads((directory / RECORD).read_text())
    command = [sys.executable, "-m", "relora_dist.cli", *run_arguments(name, lr, preset, directory), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    device = devices.get() if devices is not None else None
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        if devices is not None:
            devices.put(device)
    record = {"row": name, "method": ROWS[name][0], "lr": lr, "out": str(directory), "diverged": result.returncode != 0}
    if result.returncode != 0:
        record["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
        if "FloatingPointError" not in result.stderr and "non-finite" not in record["error"]:
            raise RuntimeError(f"{name} lr {lr:g} failed: {result.stderr[-2000:]}")  # a crash, not a divergence
        (directory / RECORD).write_text(json.dumps(record))
        return record
    record.update(read_run(preset, directory))
    (directory / RECORD).write_text(json.dumps(record))
    return record


def warm_data_cache(run_args: list[str]) -> None:
    """Train the tokenizer and pack the data once, here, so parallel runs only read the cache (no race)."""
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.trainer import build_run_data

    build_run_data(parse_run_config(run_args)[0])


def read_run(preset: Preset, directory: Path) -> dict:
    """Final validation loss and the validation curve (tokens, loss) of a finished relora-train run."""
    summary = json.loads((directory / "summary.json").read_text())
    curve = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    tokens = preset.global_batch * preset.seq_len
    return {"val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "wall_s": summary["wall_s"],
            "trainable_parameters": summary["trainable_parameters"], "diverged": not math.isfinite(summary["val_loss"]),
            "curve": [(r["step"] * tokens, r["val_loss"]) for r in curve if "val_loss" in r]
            + [(preset.steps * tokens, summary["val_loss"])]}


def finished_runs(out: Path, rows: list[str]) -> list[dict]:
    """Every run of these rows already under OUT/runs, whatever sweep it came from."""
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob(f"*/{RECORD}"))
            if json.loads(f.read_text())["row"] in rows]


def best_per_row(records: list[dict]) -> dict[str, dict]:
    best = {}
    for r in records:
        if r["diverged"]:
            best.setdefault(r["row"], r)
        elif best.get(r["row"], {}).get("diverged", True) or r["val_loss"] < best[r["row"]]["val_loss"]:
            best[r["row"]] = r
    return best


def orderings(best: dict[str, dict]) -> list[dict]:
    def ppl(name):
        r = best.get(name)
        return None if r is None or r["diverged"] else r["val_ppl"]

    out = []
    for better, worse in PAPER_ORDERINGS:
        a, b = ppl(better), ppl(worse)
        if better in best and worse in best:
            out.append({"paper": f"{better} < {worse}", "ours": None if a is None or b is None else f"{a:.2f} vs {b:.2f}",
                        "reproduced": a is not None and (b is None or a < b)})
    if "R+O" in best:
        out.append({"paper": "R+O diverges", "ours": "diverged" if best["R+O"]["diverged"] else f"{best['R+O']['val_ppl']:.2f}",
                    "reproduced": best["R+O"]["diverged"]})
    return out


def markdown(best: dict[str, dict], checks: list[dict], preset_name: str, preset: Preset, machine: str,
             tried: dict[str, list[float]]) -> str:
    lines = [f"Preset `{preset_name}`: model {preset.model}, {preset.steps} updates x {preset.global_batch} x {preset.seq_len} "
             f"tokens ({preset.steps * preset.global_batch * preset.seq_len / 1e6:.2f}M tokens per row), r {preset.rank}, "
             f"warm start {preset.warm_start}, merge every {preset.merge_every}; LR for full-rank phases, x2 once low-rank. "
             f"{machine}", "",
             "| row | method | LRs tried | best LR | val loss | val ppl | trainable params | paper ppl 60M | paper ppl 130M |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = best.get(name)
        if r is None:
            continue
        paper = PAPER.get(name, {})
        fmt = lambda v: "-" if v is None and name != "R+O" else ("diverged" if v is None else f"{v:.2f}")  # noqa: E731
        got = ("diverged", "diverged", "-") if r["diverged"] else (f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}", f"{r['trainable_parameters'] / 1e6:.2f}M")
        lines.append(f"| {name} | {r['method']} | {', '.join(f'{lr:g}' for lr in tried[name])} | {r['lr']:g} | {got[0]} | {got[1]} | {got[2]} | "
                     f"{fmt(paper.get('60m')) if '60m' in paper else '-'} | {fmt(paper.get('130m'))} |")
    lines += ["", "| paper's ordering | ours (ppl) | reproduced |", "|---|---|---|"]
    lines += [f"| {c['paper']} | {c['ours']} | {'yes' if c['reproduced'] else 'no'} |" for c in checks]
    return "\n".join(lines) + "\n"


def plot_curves(best: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in best.items():
        if not r["diverged"] and r.get("curve"):
            tokens, losses = zip(*r["curve"])
            ax.plot([t / 1e6 for t in tokens], losses, label=f"{name} (lr {r['lr']:g})",
                    linestyle="-" if name in method_names() else "--")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread or one GPU each)")
    p.add_argument("--lrs", default=None, help="comma list replacing the preset's learning rates")
    p.add_argument("--out", default="benchmarks/results/quality",
                   help="runs land in OUT/runs; finished ones are reused, and every finished run of a row counts")
    args, extra = p.parse_known_args(argv)  # anything else goes to relora-train (e.g. --dataset, --tokenizer)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    preset, out = PRESETS[args.preset], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else preset.lrs
    jobs = [(name, lr) for name in args.rows.split(",") for lr in lrs]
    warm_data_cache(run_arguments(jobs[0][0], jobs[0][1], preset, out / "runs" / "cache") + extra)
    devices = queue.Queue()
    for slot in range(args.jobs):  # GPU i % count for job slot i; None on a CPU
        devices.put(slot % torch.cuda.device_count() if torch.cuda.is_available() else None)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(lambda job: train(*job, preset, out, extra, devices), jobs):
            print(_line(record), flush=True)
    runs = finished_runs(out, args.rows.split(","))
    best = best_per_row(runs)
    tried = {name: sorted(r["lr"] for r in runs if r["row"] == name) for name in best}
    checks = orderings(best)
    from relora_dist.benchmarks.common import machine

    m = machine()
    device = m["gpu"] or f"CPU only ({m['cpu_count']} cores)"
    where = f"Measured on {device}, torch {m['torch']}."
    spectrum = spectra(best, preset, out)
    (out / "quality.json").write_text(json.dumps({"machine": m, "preset": args.preset, "settings": preset.__dict__,
                                                  "runs": runs, "best": {k: v["lr"] for k, v in best.items()},
                                                  "orderings": checks, "spectrum": spectrum, "paper": PAPER}, indent=1))
    table = markdown(best, checks, args.preset, preset, where, tried)
    if spectrum:
        table += "\n| update W_final - W_warm_start | singular values in [0.1, 1] | effective rank (mean) | numerical rank (mean) |\n|---|---|---|---|\n"
        table += "".join(f"| {k} | {100 * s['fraction_in_range']:.1f}% | {s['effective_rank']:.1f} | {s['numerical_rank']:.1f} |\n"
                         for k, s in spectrum.items())
    (out / "quality.md").write_text(table)
    plot_curves(best, out / "val_loss.png")
    print(table)
    print(f"wrote {out}/quality.json, quality.md, val_loss.png" + (", spectrum.png" if spectrum else ""))
    return 0


def _line(r: dict) -> str:
    if r["diverged"]:
        return f"{r['row']:>8} lr {r['lr']:g}: diverged ({r.get('error', 'non-finite loss')})"
    return f"{r['row']:>8} lr {r['lr']:g}: val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f}) in {r['wall_s']:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
