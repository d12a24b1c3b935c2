"""What a CPU cannot check, on one GPU in at most 8 minutes: `bash launch/gpu_check.sh [--out DIR]`.

1. `tests/test_kernels.py` compiled (no interpreter), fp32 and bf16 (RELORA_KERNEL_DEVICE=cuda);
2. `benchmarks/fused_kernels.py --quick`: fused kernels against cuBLAS, the PEFT-style unfused path and torch.compile
   at d 2048 / 4096, r 64 / 128 / 256, bf16; targets: fused forward <= 1.10x the dense GEMM at d 4096 / r 64
   (the roofline is 1.03x), fused forward+backward <= 0.8x the unfused one;
3. `examples/hf_trainer.py` (ReLoRA inside Hugging Face Trainer, two merges) on accelerate's own GPU paths, unpatched:
   DeepSpeed ZeRO-2 and FSDP2, each run's adopted engine checked (`run.json`);
4. 30-update ReLoRA runs (warm start, two merges) at world size 1 under DDP, ZeRO-2, ZeRO-3 and FSDP2, eager and
   `--compile`, fused kernels on and off: tokens/s (median per update), MFU, peak memory from NVML.

Writes DIR/gpu_check.json and DIR/summary.txt. Exit 0 when every step ran and passed, 1 when one broke or did
not fit the time budget (never a silent skip), 2 without a GPU. `--strict-targets` also fails a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from relora_dist.backends.labels import ENGINE_LABELS

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {name: ENGINE_LABELS[name].train_flags() for name in ("ddp", "zero2", "zero3", "fsdp2")}
MODEL = {"preset": "350m", "vocab_size": 4096, "seq_len": 512, "rank": 128}
RUN_ARGS = ["--model", MODEL["preset"], "--vocab-size", str(MODEL["vocab_size"]), "--seq-len", str(MODEL["seq_len"]),
            "--global-batch-size", "16", "--micro-batch-size", "16", "--dtype", "bf16", "--rank", str(MODEL["rank"]),
            "--method", "relora", "--steps", "30", "--warm-start-steps", "10", "--merge-every", "10",
            "--restart-warmup-steps", "2", "--lr", "1e-3", "--eval-every", "0", "--eval-batches", "1", "--save-every", "0",
            "--progress", "false"]
TARGETS = {"fused_fwd_vs_dense": 1.10, "fused_fwd_bwd_vs_unfused": 0.8}  # at K = N = 4096, r = 64, bf16
STEP_TIMEOUT_S = {"kernel_tests": 180, "kernel_bench": 120, "hf_trainer": 90, "run": 90}
HF_TRAINER = {"deepspeed": ["--deepspeed", "launch/configs/zero2.json"], "fsdp2": ["--fsdp2"]}  # engine: example flags
HF_TRAINER_ARGS = ["--method", "relora", "--model", "tiny", "--steps", "24", "--merge-every", "10",
                   "--restart-warmup-steps", "2", "--bf16"]


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunCase:
    engine: str
    compile: bool
    fused: bool

    @property
    def name(self) -> str:
        return f"{self.engine}/{'compile' if self.compile else 'eager'}/fused-{'on' if self.fused else 'off'}"

    def train_args(self, out: Path) -> list[str]:
        return [*RUN_ARGS, *ENGINES[self.engine], "--compile", str(self.compile).lower(),
                "--fused-kernels", "on" if self.fused else "off", "--out", str(out), "--overwrite", "true"]


def plan_runs() -> list[RunCase]:
    """Eager first: when the budget runs out, what is left unmeasured is the compiled half."""
    return [RunCase(engine, compiled, fused) for compiled in (False, True) for engine in ENGINES for fused in (False, True)]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_step(name: str, command: list[str], *, timeout_s: float, env: dict | None = None) -> tuple[Check, str]:
    """One subprocess; a non-zero exit or a timeout is a failed check with the output's tail as its error."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Check(name, False, time.perf_counter() - start, error=f"timed out after {timeout_s:.0f} s\n{_tail(output)}"), output
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        return Check(name, False, seconds, error=f"exit {done.returncode}\n{_tail(output)}"), output
    return Check(name, True, seconds), output


def kernel_targets(kernels_json: dict) -> list[dict]:
    """Each target with its measured value at K = N = 4096, r = 64 (met / missed; missing data is an error)."""
    rows = [r for r in kernels_json.get("measured", []) if r["K"] == 4096 and r["N"] == 4096 and r["r"] == 64]
    if not rows:
        raise ValueError("benchmarks/fused_kernels.py measured no K = N = 4096, r = 64 row")
    row = rows[0]
    values = {"fused_fwd_vs_dense": row["fused_fwd_ms"] / row["dense_fwd_ms"],
              "fused_fwd_bwd_vs_unfused": row["fused_fwd_bwd_ms"] / row["peft_fwd_bwd_ms"]}
    return [{"target": k, "value": values[k], "limit": limit, "met": values[k] <= limit} for k, limit in TARGETS.items()]


def run_figures(out: Path) -> dict:
    """Median tokens/s and MFU per update (the trainer's columns, against the GPU's bf16 peak; its clock leaves merges
    out), first-update seconds (startup and compilation)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    median = {key: statistics.median(r[key] for r in records) if key in records[0] else None  # the median drops compiles
              for key in ("tokens_per_s", "mfu")}
    return {**median, "first_update_wall_s": records[0]["wall_s"], "val_loss": summary["val_loss"], "steps": summary["steps"]}


def summarize(report: dict) -> str:
    lines = [f"gpu_check on {report['device']} ({report['seconds']:.0f} s of {report['budget_s']:.0f} s):"
             f" {'PASS' if report['ok'] else 'FAIL'}"]
    for check in report["checks"]:
        d = check["detail"]
        figures = ""
        if "tokens_per_s" in d:
            mfu = f", MFU {100 * d['mfu']:.1f}%" if d.get("mfu") is not None else ""
            figures = f"  {d['tokens_per_s']:.0f} tok/s{mfu}, peak {d.get('peak_memory_gib', float('nan')):.1f} GiB"
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']:<28} {check['seconds']:6.1f} s{figures}")
        if check["error"]:
            lines += ["       " + line for line in check["error"].splitlines()[:6]]
    for t in report.get("targets", []):
        lines.append(f"  target {t['target']}: {t['value']:.3f} (<= {t['limit']}) {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "gpu_check_out"), help="report folder (runs, caches, JSON, summary)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check")
    p.add_argument("--strict-targets", action="store_true", help="a missed performance target fails the check")
    p.add_argument("--plan", action="store_true", help="print the relora-train argument lists of the runs and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.plan:
        print(json.dumps({case.name: case.train_args(out / "runs" / case.name.replace("/", "_")) for case in plan_runs()}, indent=1))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing was checked", file=sys.stderr)
        return 2
    from relora_dist.benchmarks.common import torchrun_command
    from relora_dist.perf.memory import PeakSampler

    start = time.perf_counter()
    deadline = start + args.budget_s
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    env = dict(os.environ, RELORA_CACHE=str(out / "cache"), TORCHINDUCTOR_CACHE_DIR=str(out / "inductor"),
               TRITON_CACHE_DIR=str(out / "triton"), TRITON_INTERPRET="0")
    checks: list[Check] = []
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "budget_s": args.budget_s,
              "model": MODEL, "run_args": RUN_ARGS, "checks": [], "targets": []}

    def left(limit: float) -> float:
        return min(limit, deadline - time.perf_counter())

    def out_of_time(name: str) -> Check:
        return Check(name, False, 0.0, error="not run: the time budget (--budget-s) was spent")

    # 1. kernel tests, compiled
    if left(1) > 0:
        check, output = run_step("kernel_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                  "tests/test_kernels.py"], timeout_s=left(STEP_TIMEOUT_S["kernel_tests"]),
                                 env=dict(env, RELORA_KERNEL_DEVICE="cuda"))
        check.detail["pytest"] = _tail(output, 1)
        checks.append(check)
    else:
        checks.append(out_of_time("kernel_tests"))

    # 2. kernel benchmark and its targets
    kernels_path = out / "kernels.json"
    if left(1) > 0:
        check, _ = run_step("kernel_bench", [sys.executable, "benchmarks/fused_kernels.py", "--quick", "--out", str(kernels_path)],
                            timeout_s=left(STEP_TIMEOUT_S["kernel_bench"]), env=env)
        if check.ok:
            try:
                report["targets"] = kernel_targets(json.loads(kernels_path.read_text()))
            except (ValueError, KeyError, OSError) as e:
                check.ok, check.error = False, f"kernels.json unreadable: {e}"
        checks.append(check)
    else:
        checks.append(out_of_time("kernel_bench"))

    # 3. Hugging Face Trainer on its own GPU engines
    for engine, flags in HF_TRAINER.items():
        name = f"hf_trainer/{engine}"
        if left(1) <= 5:
            checks.append(out_of_time(name))
            continue
        run_out = out / "runs" / name.replace("/", "_")
        command = torchrun_command(1, "examples/hf_trainer.py", *HF_TRAINER_ARGS, *flags, "--out", str(run_out))
        check, _ = run_step(name, command, timeout_s=left(STEP_TIMEOUT_S["hf_trainer"]), env=env)
        if check.ok:
            try:
                record = json.loads((run_out / "run.json").read_text())
                merges = max(r.get("merges", 0) for r in record["log_history"])
                check.detail = {"engine": record["engine"], "merges": merges}
                check.ok = record["engine"] == engine and merges == 2
            except (OSError, KeyError, ValueError) as e:
                check.ok, check.error = False, f"run.json unreadable: {e}"
        checks.append(check)

    # 4. training runs
    for case in plan_runs():
        if left(1) <= 5:
            checks.append(out_of_time(case.name))
            continue
        run_out = out / "runs" / case.name.replace("/", "_")
        command = torchrun_command(1, "launch/train.py", *case.train_args(run_out))
        with PeakSampler(device) as sampler:
            baseline = sampler.peak
            check, _ = run_step(case.name, command, timeout_s=left(STEP_TIMEOUT_S["run"]), env=env)
        if check.ok:
            try:
                check.detail = run_figures(run_out)
            except (OSError, KeyError, ValueError) as e:
                check.ok, check.error = False, f"run wrote no readable metrics: {e}"
        check.detail["peak_memory_gib"] = (sampler.peak - baseline) / 2**30
        check.detail["memory_source"] = sampler.source
        checks.append(check)

    report["checks"] = [asdict(c) for c in checks]
    report["seconds"] = time.perf_counter() - start
    targets_ok = all(t["met"] for t in report["targets"]) or not args.strict_targets
    report["ok"] = all(c.ok for c in checks) and targets_ok
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = summarize(report)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'summary.txt'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
