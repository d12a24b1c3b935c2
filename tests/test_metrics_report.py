"""The metric columns, --report-to tensorboard / wandb, and relora-plot, on real single-process runs."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, SMALL, read_metrics, run_cli
from relora_dist.metrics import scalar_tags, throughput_fields

RUN = SMALL + ["--method", "relora", "--steps", "8", "--warm-start-steps", "2", "--merge-every", "3", "--restart-warmup-steps", "1", "--eval-every", "4",
               "--save-every", "3"]


def test_columns():
    speed = throughput_fields(tokens=1024, examples=8, seconds=0.5, world_size=2)
    assert speed == {"tokens_per_s": 2048, "tokens_per_s_per_rank": 1024, "examples_per_s": 16}
    tags = scalar_tags({"step": 3, "wall_s": 1.0, "loss": 2.5, "low_rank": True, "events": ["merge"], "merge_s": 0.1})
    assert tags == {"train/loss": 2.5, "other/low_rank": 1.0, "other/merge_s": 0.1}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Killed at update 6 (5 logged, the last checkpoint at 3), then resumed to 8, with TensorBoard on."""
    out = tmp_path_factory.mktemp("tb") / "run"
    args = RUN + ["--out", out, "--report-to", "tensorboard"]
    killed = run_cli(args, check=False, env={"RELORA_INJECT_FAULTS": "kill:6"})
    assert killed.returncode != 0 and [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]
    run_cli(args + ["--resume", "latest"])
    return out


@pytest.mark.dist
def test_tensorboard_has_one_scalar_per_step_after_a_resume(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = read_metrics(resumed_run)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    events = EventAccumulator(str(resumed_run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # steps 4 and 5 logged twice, shown once
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [4]
    for tag in ("train/lr", "train/grad_norm", "throughput/tokens_per_s", "throughput/mfu", "memory/rss_gib"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 9)), tag
    assert all(m["mfu"] > 0 and m["rss_gib"] > 0 for m in metrics)
    assert [m["events"] for m in metrics if m.get("events")] == [["wrap"], ["merge", "reset"]]  # updates 2 and 6


@pytest.mark.dist
def test_relora_plot(resumed_run, tmp_path):
    png = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "relora_dist.cli.plot", str(resumed_run), str(resumed_run),
                           "--out", str(png)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "relora_dist.cli.plot", str(tmp_path), "--out", str(png)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "holds no metrics.jsonl" in bad.stderr


@pytest.mark.dist
def test_wandb_offline_run_continues_after_a_resume(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    args = RUN + ["--out", out, "--report-to", "wandb"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_cli(args + ["--stop-after", "3"], env=env)
    run_id = (out / "wandb_id").read_text()
    run_cli(args + ["--resume", "latest"], env=env)
    assert (out / "wandb_id").read_text() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    # The records are W&B's own binary log; a history value is stored as its JSON text.
    first, second = ((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    last_loss = json.dumps(read_metrics(out)[-1]["loss"]).encode()
    assert b"train/loss" in first and b"throughput/mfu" in first and last_loss not in first and last_loss in second
