"""Shared helpers: real CLI runs (single process or torchrun with 2 gloo ranks) on a tiny model.

Every test that starts a process (these helpers, subprocess, torchrun, the deepspeed launcher, multiprocessing)
carries the `dist` marker (pytest.ini), so that `pytest -m "not dist"` is the in-process inner loop.
RELORA_CHECK_DIST_MARKS=1 checks that: an unmarked test that starts a process from this checkout's code fails at
the launch (see check_dist_marks below)."""

import contextlib
import glob
import multiprocessing.process
import json
import os
import random
import time

# The Triton kernels run on the CPU through the interpreter; triton reads this when a kernel is defined.
# RELORA_KERNEL_DEVICE=cuda (launch/gpu_check.sh) runs tests/test_kernels.py compiled on a GPU instead.
if os.environ.get("RELORA_KERNEL_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relora_dist.backends.labels import ENGINE_LABELS

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")

# A debug-sized LLaMA on the embedded corpus. Adam eps 1e-3: with eps 1e-8 Adam turns float
# summation-order noise in near-zero gradients into +-lr sign flips, which would hide real bugs
# behind a loose tolerance; with 1e-3 the update is smooth in g and 1-vs-2-rank runs agree to ~1e-6.
SMALL = [
    "--model", "debug", "--seq-len", "64", "--vocab-size", "1024", "--global-batch-size", "8",
    "--micro-batch-size", "2", "--lr", "0.003", "--warmup-steps", "2", "--eval-every", "0",
    "--eval-batches", "2", "--progress", "false", "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
    "--eps", "1e-3",
]

# Warm start, then two merges/resets (updates 7 and 10), for the engine-vs-single-process CLI runs.
# Low-rank factors at twice --lr, the rest at --lr (--lora-lr-scope factors): every engine keeps the param groups
# apart by name, so its 2-rank run equals the single-process reference only if each group gets its own rate.
RELORA_RUN = ["--method", "relora", "--steps", "12", "--warm-start-steps", "3", "--merge-every", "3",
              "--restart-warmup-steps", "1", "--prune-ratio", "0.8", "--lora-lr", "0.006", "--lora-lr-scope", "factors"]


# --------------------------------------------------------------------------------------------------------------------
# RELORA_CHECK_DIST_MARKS=1 pytest -m "not dist": every process a test without the `dist` marker starts, in its
# fixtures' setup or in its body, fails it at the launch. The launch is charged to its innermost caller outside the
# plumbing that starts processes (the standard library, torch.multiprocessing's spawn, torchrun's agent, deepspeed's
# launcher): it counts when that caller is this checkout's code (a test, conftest, relora_dist, launch/, benchmarks/).
# So mp.spawn from relora_dist counts; the processes torch starts on its own (Inductor's C++ compiler, DataLoader
# workers) and the forked workers of a pool (relora-data prepare tokenizes in a multiprocessing.Pool) do not.
CHECK_DIST_MARKS = os.environ.get("RELORA_CHECK_DIST_MARKS", "0") == "1"
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep
_POOLS = tuple(_STDLIB + os.path.join(*parts) for parts in [("multiprocessing", "pool.py"),
                                                             ("concurrent", "futures", "process.py")])
_LAUNCHERS = ("/torch/multiprocessing/", "/torch/distributed/", "/deepspeed/launcher/")


def _launched_by_this_checkout(frame) -> bool:
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if path in _POOLS:
            return False
        plumbing = frame.f_code.co_filename.startswith("<") or path.startswith(_STDLIB) or any(
            part in path for part in _LAUNCHERS)
        if not plumbing:
            return path.startswith(str(REPO) + os.sep) and "site-packages" not in path
        frame = frame.f_back
    return False


@contextlib.contextmanager
def check_dist_marks(item):
    """Patch the two ways a process starts (subprocess.Popen, which subprocess.run and torchrun's agent use, and
    multiprocessing's Process.start, which mp.spawn uses) for the duration of an unmarked test's setup or call."""
    if not CHECK_DIST_MARKS or item.get_closest_marker("dist") is not None:
        yield
        return
    execute_child, start = subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start

    def refuse(what, caller):
        if _launched_by_this_checkout(caller):
            pytest.fail(f"{item.nodeid} starts a process ({what}) but has no `dist` marker "
                        "(pytestmark = pytest.mark.dist, or @pytest.mark.dist on the test)")

    def checked_execute_child(self, args, *rest):
        refuse(args if isinstance(args, (str, bytes)) else " ".join(map(str, args))[:200], sys._getframe(1))
        return execute_child(self, args, *rest)

    def checked_start(self):
        refuse(f"multiprocessing {self.name}", sys._getframe(1))
        return start(self)

    subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start = checked_execute_child, checked_start
    try:
        yield
    finally:
        subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start = execute_child, start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with check_dist_marks(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with check_dist_marks(item):
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One tokenizer/packed-data cache for the whole session (also used by subprocesses)."""
    cache = tmp_path_factory.mktemp("relora_cache")
    old = os.environ.get("RELORA_CACHE")
    os.environ["RELORA_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("RELORA_CACHE", None)
    else:
        os.environ["RELORA_CACHE"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(script, nproc=2) -> list[str]:
    """The `deepspeed` launcher (it passes --local_rank=N to every rank)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script)]


def launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_cli(args, *, nproc=1, timeout=300, check=True, launcher="torchrun", env=None, script=TRAIN):
    """Run relora-train for real: torchrun (or the deepspeed launcher) with gloo ranks when nproc > 1.
    `env`: extra environment variables (e.g. RELORA_INJECT_FAULTS); `script`: another entry point."""
    script = str(script)
    if launcher == "deepspeed":
        cmd = deepspeed_command(script, nproc)
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    env = launch_env() | (env or {})
    result = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT\n{result.stdout[-3000:]}\nSTDERR\n{result.stderr[-5000:]}")
    return result


def load_run(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / latest / "model.pt", map_location="cpu", weights_only=True)
    return summary, metrics, state


def registered_methods() -> list[str]:
    """The registry as a fresh process sees it, in --method order (test modules register test-only methods in this
    one)."""
    code = "from relora_dist.methods import method_names; print(','.join(method_names()))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip().split(",")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-12)).item() for k in a)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shared_cache):
    """Single-process torch run of SMALL + RELORA_RUN with a merged export (micro-batch 4, so the accumulation
    differs from the engines' runs too): what every engine's 2-rank run must equal."""
    out = tmp_path_factory.mktemp("reference")
    run_cli(SMALL + RELORA_RUN + ["--out", out, "--micro-batch-size", "4", "--export-merged", out / "hf"])
    return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def exported(directory: Path) -> dict:
    return load_file(glob.glob(str(directory / "*.safetensors"))[0])


def assert_run_equals_reference(out: Path, reference_run: Path, backend: str) -> None:
    """A 2-rank engine run of SMALL + RELORA_RUN with `--export-merged OUT/hf` equals the single-process
    reference: two merges and resets, at updates 7 and 10 and at LR 0 (I5), the same losses and merged model."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == backend and summary["merges"] == summary["resets"] == 2
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if m.get("merge_s") is not None] == [7, 10]
    assert all(m["lr"] == 0.0 for m in metrics if m.get("merge_s") is not None)
    for a, b in zip(metrics, read_metrics(reference_run), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert max_relative_difference(exported(reference_run / "hf"), exported(out / "hf")) < 1e-5


# A dead rank must end the job this quickly (launchers notice a dead child; survivors see the lost peer).
KILL_DEADLINE_S = 30


def killed_run(args, out: Path, *, nproc=2, launcher="torchrun") -> str:
    """Run relora-train with a checkpoint every 2 updates and SIGKILL one rank at a random update (forward
    or inside backward): the job must exit non-zero within KILL_DEADLINE_S of its last logged update,
    having logged exactly the updates before the kill. Returns the fault drawn (RELORA_CHAOS_SEED fixes it)."""
    rng = random.Random(os.environ.get("RELORA_CHAOS_SEED"))
    attempt, rank = rng.randint(5, 11), rng.randrange(nproc)
    fault = f"{rng.choice(['kill', 'kill_backward'])}:{attempt}:rank={rank}"
    result = run_cli(args + ["--out", out, "--save-every", "2"], nproc=nproc, launcher=launcher, check=False,
                     env={"RELORA_INJECT_FAULTS": fault})
    lag = time.time() - (out / "metrics.jsonl").stat().st_mtime
    assert result.returncode != 0, f"{fault}: the job survived a dead rank\n{result.stderr[-3000:]}"
    assert lag < KILL_DEADLINE_S, f"{fault}: the job took {lag:.0f} s to notice a dead rank"
    assert [m["step"] for m in read_metrics(out)] == list(range(1, attempt)), fault
    return fault


# --------------------------------------------------------------------------------------------------------------------
# Several relora-train runs in one launch (tests/dist/method_runs.py): the engine tests of the non-ReLoRA methods.
METHOD_RUNS = REPO / "tests" / "dist" / "method_runs.py"
ENGINE_FLAGS = {name: label.train_flags(REPO / "launch" / "configs") for name, label in ENGINE_LABELS.items()}


def launch_runs(cases: list[dict], common: list, *, nproc: int, tmp_path, launcher: str = "torchrun",
                script: Path = METHOD_RUNS) -> str:
    """The cases run one after another in one launch of `script` (tests/dist/method_runs.py: relora-train runs;
    hf_trainer_runs.py: examples/hf_trainer.py runs); its stdout once every case printed `RUN OK <name>`."""
    launch = f"cases_{len(list(tmp_path.glob('cases_*.json')))}_{nproc}"  # one name per launch in tmp_path
    spec = tmp_path / f"{launch}.json"
    spec.write_text(json.dumps({"common": [str(a) for a in common],
                                "cases": [{**c, "args": [str(a) for a in c["args"]]} for c in cases]}))
    if launcher == "deepspeed":
        cmd = deepspeed_command(script, nproc) + [str(spec)]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), str(spec)]
    else:
        cmd = [sys.executable, str(script), str(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=launch_env())
    if out.returncode != 0:  # the ranks' own error lines first: torchrun's summary buries them
        (tmp_path / f"{launch}.stderr").write_text(out.stderr)
        errors = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line][:20]
        raise AssertionError("\n".join([f"exit {out.returncode}", out.stdout[-2000:], *errors, out.stderr[-3000:]]))
    (tmp_path / f"{launch}.stdout").write_text(out.stdout)
    for case in cases:
        assert f"RUN OK {case['name']} " in out.stdout, case["name"]
    return out.stdout


def for_method(cases: list[dict], method: str) -> list[dict]:
    """`cases` run with --method `method` and named `method/<name>` (several methods' cases in one launch)."""
    for case in cases:
        case["args"] += ["--method", method]
        case["name"] = f"{method}/{case['name']}"
    return cases


def distance(a: dict, b: dict) -> float:
    return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt().item()


def run_case(name, tmp_path, *args, env=None, export=True):
    out = tmp_path / name
    return {"name": name, "args": [*args, "--out", out, *(["--export-merged", out / "hf"] if export else [])],
            "env": env or {}}


def initial_weights(run) -> dict:
    """The model every run starts from: relora-train seeds with --seed (0) and builds the method's architecture
    (registered with the Auto classes when relora_dist is imported)."""
    from transformers import AutoModelForCausalLM

    from relora_dist.models import config_from_dict

    config = config_from_dict(json.loads(next((run / "checkpoints").glob("step_*/model_config.json")).read_text()))
    torch.manual_seed(0)
    return {k: v.detach() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}


@pytest.fixture
def log_to_this_tests_stderr(monkeypatch):
    """For tests that call train_main / export_main in-process and read capsys: stream handlers an earlier test's call
    made still write to that test's (closed) stderr."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stderr)
