"""Fixed-seed fingerprint of every method on every engine, for changes that must not move a number.

Runs relora-train (debug model, embedded corpus, CPU/gloo) for each method x engine, and records the
per-update losses, LRs and gradient norms exactly as metrics.jsonl holds them, the final validation loss,
and a SHA-256 of every tensor of the merged export. Run it before and after a refactor and compare:

    python launch/numerics_fingerprint.py --out /tmp/before.json
    ... change the code ...
    python launch/numerics_fingerprint.py --out /tmp/after.json --compare /tmp/before.json

Exit status 1 when a compared entry differs (bit for bit) or is missing. `--methods` / `--engines` pick a subset.

`launch/fingerprint_baseline.json` is the committed baseline of every method on every engine (its `_meta` says the
commit, command and machine that recorded it); compare a change against it without rebuilding it first:

    python launch/numerics_fingerprint.py --out /tmp/after.json --compare launch/fingerprint_baseline.json

The figures are bit-exact on one machine type and torch build (the CPU box CI and development use); elsewhere,
record a baseline from a clean checkout first.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's relora_dist, for the engine labels

from relora_dist.backends.labels import ENGINE_LABELS  # noqa: E402
TRAIN = str(REPO / "launch" / "train.py")

COMMON = ["--model", "debug", "--seq-len", "64", "--vocab-size", "1024", "--global-batch-size", "8",
          "--micro-batch-size", "2", "--lr", "0.003", "--warmup-steps", "2", "--eval-every", "4",
          "--eval-batches", "2", "--progress", "false", "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
          "--eps", "1e-3", "--steps", "12", "--seed", "3"]
# Per method: a warm start where it has one, two merges and resets for relora (updates 7 and 10).
METHOD_ARGS = {
    "full": [],
    "control": [],
    "lora": [],
    "lora_ws": ["--warm-start-steps", "3"],
    "relora": ["--warm-start-steps", "3", "--merge-every", "3", "--restart-warmup-steps", "1", "--prune-ratio", "0.8"],
    "cola": [],
    "cola_m": [],
    "crnet": ["--crnet-recompute-every", "2"],  # the inverse recomputation is the path worth fingerprinting
    "galore": ["--galore-update-gap", "5"],  # refreshes at 0, 5, 10 (on ZeRO-2/3: the flat-partition step)
    "fira": ["--galore-update-gap", "5"],
    # a switch of up to 2 vectors a side before most updates
    "switchlora": ["--switchlora-interval", "2", "--switchlora-freeze-steps", "1", "--switchlora-descent-rate", "100"],
    # resamples every 3 updates, re-SVDs every 6
    "sst": ["--sst-iteration-steps", "3", "--sst-round-iterations", "2", "--sst-restart-warmup", "1"],
}
# single process, then 2 ranks of each engine label (relora_dist/backends/labels.py)
ENGINES = {"single": (1, "python", []),
           **{name: (2, ENGINE_LABELS[name].launcher, ENGINE_LABELS[name].train_flags(REPO / "launch" / "configs"))
              for name in ("ddp", "zero2", "zero3", "fsdp2", "fairscale")}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(engine: str) -> list[str]:
    nproc, launcher, _ = ENGINES[engine]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(_port()), TRAIN]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN]
    return [sys.executable, TRAIN]


def run_arguments(method: str, engine: str, out: Path, extra: list[str]) -> list[str]:
    """relora-train's flags for one entry (--method always: it was once missing, and every entry ran ReLoRA)."""
    return (COMMON + ["--method", method] + METHOD_ARGS[method] + ENGINES[engine][2] + extra
            + ["--out", str(out), "--overwrite", "true", "--export-merged", str(out / "hf")])


def fingerprint(method: str, engine: str, work: Path, extra: list[str]) -> dict:
    out = work / f"{method}_{engine}"
    args = run_arguments(method, engine, out, extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    result = subprocess.run(command(engine) + args, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
    from safetensors.torch import load_file

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tensors = load_file(glob.glob(str(out / "hf" / "*.safetensors"))[0])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "updates": [[m["step"], m["loss"], m["lr"], m["grad_norm"], m.get("val_loss")] for m in metrics],
        "val_loss": summary["val_loss"],
        "merges": summary.get("merges"), "resets": summary.get("resets"),  # None for methods without them
        "export": {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()
                   for k, v in sorted(tensors.items())},
    }


def recording_meta() -> dict:
    """Who recorded a fingerprint file: the numbers are bit-exact only on the same machine type and torch build."""
    import platform

    import torch

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join(["python", "launch/numerics_fingerprint.py", *sys.argv[1:]]), "commit": commit,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--compare", help="an earlier fingerprint JSON: report every entry that differs")
    parser.add_argument("--methods", default=",".join(METHOD_ARGS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--extra", default="", help="extra relora-train flags for every run (space separated)")
    args = parser.parse_args()
    cache = Path(os.environ.setdefault("RELORA_CACHE", tempfile.mkdtemp(prefix="relora_fp_cache_")))
    results = {}
    with tempfile.TemporaryDirectory(prefix="relora_fp_") as tmp:
        for method in args.methods.split(","):
            for engine in args.engines.split(","):
                start = time.perf_counter()
                results[f"{method}/{engine}"] = fingerprint(method, engine, Path(tmp), args.extra.split())
                status = "error " + str(results[f"{method}/{engine}"]["error"]) if "error" in results[f"{method}/{engine}"] else "ok"
                print(f"{method:>8} {engine:>9}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.out).write_text(json.dumps({"_meta": recording_meta(), **results}, indent=1, sort_keys=True))
    print(f"wrote {args.out} (cache {cache})")
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differing = [key for key in results if key in before and results[key] != before[key]]
    missing = [key for key in results if key not in before]
    if missing:
        print(f"not in {args.compare}: {', '.join(missing)}")
    for key in differing:
        print(f"DIFFERS {key}")
    print(f"{len(results) - len(differing) - len(missing)} of {len(results)} entries identical to {args.compare}")
    return 1 if differing or missing else 0


if __name__ == "__main__":
    sys.exit(main())
