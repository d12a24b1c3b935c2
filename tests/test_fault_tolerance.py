"""Faults injected into real 2-rank runs (RELORA_INJECT_FAULTS): a kill mid-checkpoint, a hung rank,
non-finite losses and gradients on one rank. Killed ranks at random updates are in each engine's resume
test (tests/test_ddp.py, test_fsdp2.py, test_deepspeed.py, through conftest.killed_run)."""

import json
import time

import pytest
import torch

from conftest import (KILL_DEADLINE_S, REPO, RELORA_RUN, SMALL, exported, launch_runs, max_relative_difference, read_metrics,
                      run_case, run_cli)
from relora_dist.ranges import assemble_ranges
from relora_dist.train.checkpoint import resolve_checkpoint
from relora_dist.train.faults import FaultPlan, parse_faults

FAULTS = "RELORA_INJECT_FAULTS"


@pytest.mark.dist
def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference_run):
    """Rank 0 dies after writing its part of checkpoint 6, before the commit: `latest` still names checkpoint 4,
    the half-written one is ignored (and cleaned up by the next commit), and the resumed run ends at the
    single-process reference."""
    args = SMALL + RELORA_RUN + ["--out", tmp_path, "--save-every", "2"]
    killed = run_cli(args, nproc=2, check=False, env={FAULTS: "kill_checkpoint:6:rank=0"})
    assert killed.returncode != 0
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step_0000006.tmp").is_dir() and not (checkpoints / "step_0000006").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_0000004"
    run_cli(args + ["--resume", "--export-merged", tmp_path / "hf"], nproc=2)
    assert not list(checkpoints.glob("*.tmp"))
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))
    assert [m["loss"] for m in read_metrics(tmp_path)] == pytest.approx([m["loss"] for m in read_metrics(reference_run)], rel=1e-5)
    assert max_relative_difference(exported(reference_run / "hf"), exported(tmp_path / "hf")) < 1e-5


@pytest.mark.dist
def test_a_requeued_job_resumes_itself_with_resume_auto(tmp_path, reference_run):
    """What a scheduler's requeue (or `torchrun --max-restarts`) does: the same command again. With `--resume auto`
    the first launch starts afresh, rank 1 dies at update 7; the second launch resumes from checkpoint 6 by
    itself and ends at the reference."""
    args = SMALL + RELORA_RUN + ["--out", tmp_path, "--save-every", "2", "--resume", "auto", "--export-merged", tmp_path / "hf"]
    assert run_cli(args, nproc=2, check=False, env={FAULTS: "kill:7:rank=1"}).returncode != 0
    again = run_cli(args, nproc=2)
    assert "checkpoints/step_0000006 at update 6" in again.stderr
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))
    assert [m["loss"] for m in read_metrics(tmp_path)] == pytest.approx([m["loss"] for m in read_metrics(reference_run)], rel=1e-5)
    assert max_relative_difference(exported(reference_run / "hf"), exported(tmp_path / "hf")) < 1e-5


def test_faults_fire_in_the_first_launch_only(monkeypatch):
    """So that `torchrun --max-restarts` brings a job with injected faults back."""
    monkeypatch.setenv(FAULTS, "kill:3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert FaultPlan.from_env(rank=0).faults
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not FaultPlan.from_env(rank=0).faults


@pytest.mark.dist
@pytest.mark.parametrize("engine", [["--backend", "ddp"], ["--deepspeed", str(REPO / "launch" / "configs" / "zero2.json")]],
                         ids=["ddp", "zero2"])
def test_a_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path, engine):
    """Rank 1 stops answering at update 5: rank 0's next collective times out after --dist-timeout-s (DeepSpeed's own
    data-parallel groups too), it says so in one line, and the launcher ends the job."""
    args = SMALL + RELORA_RUN + engine + ["--out", tmp_path, "--dist-timeout-s", "5"]
    result = run_cli(args, nproc=2, check=False, env={FAULTS: "hang:5:rank=1"}, timeout=150,
                     launcher="deepspeed" if "--deepspeed" in engine else "torchrun")
    lag = time.time() - (tmp_path / "metrics.jsonl").stat().st_mtime
    assert result.returncode != 0 and 5 <= lag < 5 + KILL_DEADLINE_S, (result.returncode, lag)
    assert "relora-train: error: rank 0 lost contact with a peer" in result.stderr
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.dist
def test_replica_check_stops_a_run_whose_control_state_diverged(tmp_path):
    """--check-replicas covers a method's control buffers on DeepSpeed: SwitchLoRA's last freeze counter moves on rank
    1 before update 3, the check after that update names it, and the run stops."""
    args = SMALL + ["--method", "switchlora", "--steps", "6", "--switchlora-interval", "2", "--switchlora-freeze-steps",
                    "1", "--check-replicas", "true", "--deepspeed", REPO / "launch" / "configs" / "zero2.json", "--out", tmp_path]
    result = run_cli(args, nproc=2, check=False, launcher="deepspeed", env={FAULTS: "desync:3:rank=1"}, timeout=150)
    assert result.returncode != 0
    assert "replicas diverged after update 3" in result.stderr and "down_proj.freeze_B" in result.stderr, result.stderr[-2000:]
    assert max(m["step"] for m in read_metrics(tmp_path)) <= 3


@pytest.fixture(scope="module")
def non_finite_reference(tmp_path_factory, shared_cache):
    """Single process; attempt 5 (after the warm start) has a NaN loss, attempt 9 infinite gradients."""
    out = tmp_path_factory.mktemp("non_finite_reference")
    run_cli(SMALL + RELORA_RUN + ["--out", out, "--micro-batch-size", "4", "--export-merged", out / "hf"],
            env={FAULTS: "nan_loss:5;inf_grad:9"})
    return out


NON_FINITE_ENGINES = {"ddp": ["--backend", "ddp"], "fsdp2": ["--backend", "fsdp2"],
                      "zero2": ["--deepspeed", str(REPO / "launch" / "configs" / "zero2.json")]}


@pytest.fixture(scope="module")
def non_finite_runs(tmp_path_factory, shared_cache):
    """Every engine's run with one rank's NaN loss (rank 1, attempt 5) and another's inf gradients (rank 0, attempt
    9), one launch."""
    root = tmp_path_factory.mktemp("non_finite")
    launch_runs([run_case(name, root, *flags, env={FAULTS: "nan_loss:5:rank=1;inf_grad:9:rank=0"})
                 for name, flags in NON_FINITE_ENGINES.items()], SMALL + RELORA_RUN, nproc=2, tmp_path=root)
    return root


@pytest.mark.dist
@pytest.mark.parametrize("engine", list(NON_FINITE_ENGINES))
def test_non_finite_updates_are_skipped_on_every_rank_alike(non_finite_runs, non_finite_reference, engine):
    """Only one rank sees the NaN loss (rank 1) or the inf gradients (rank 0): both updates are skipped everywhere,
    the merges stay at updates 7 and 10 at LR 0 (I5), and the run equals the single-process run with the same
    two skips."""
    tmp_path = non_finite_runs / engine
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped"] == 2 and summary["steps"] == 12 and summary["merges"] == summary["resets"] == 2
    assert summary["train_tokens"] == 14 * 8 * 64  # 14 global batches consumed for 12 updates
    metrics, reference = read_metrics(tmp_path), read_metrics(non_finite_reference)
    assert [m["step"] for m in metrics if m.get("merge_s") is not None] == [7, 10]
    assert all(m["lr"] == 0.0 for m in metrics if m.get("merge_s") is not None)
    assert [m["lr"] for m in metrics] == [m["lr"] for m in reference]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference], rel=1e-5)
    assert max_relative_difference(exported(non_finite_reference / "hf"), exported(tmp_path / "hf")) < 1e-5


@pytest.mark.dist
def test_consecutive_non_finite_updates_abort_in_one_line_and_keep_the_last_good_checkpoint(tmp_path):
    args = SMALL + RELORA_RUN + ["--out", tmp_path, "--save-every", "2", "--max-consecutive-skips", "3"]
    result = run_cli(args, nproc=2, check=False, env={FAULTS: "nan_loss:5-30:rank=1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("relora-train: error:")]
    assert errors == ["relora-train: error: 3 consecutive non-finite updates; aborting (--max-consecutive-skips)"]
    assert "]: Traceback" not in result.stderr  # no rank's traceback (torchrun prints its own ChildFailedError)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    state = torch.load(tmp_path / "checkpoints" / "step_0000004" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_latest_falls_back_to_the_newest_committed_checkpoint(tmp_path):
    """A kill between the commit (rename) and the pointer update, or while a same-step checkpoint is moved aside."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_000000{step}").mkdir(parents=True)
        (root / f"step_000000{step}" / "trainer_state.json").write_text("{}")
    (root / "step_0000006.tmp").mkdir()
    assert resolve_checkpoint("latest", tmp_path) == root / "step_0000004"  # no pointer yet
    (root / "latest").write_text("step_0000002")
    assert resolve_checkpoint("latest", tmp_path) == root / "step_0000002"  # the pointer wins when valid
    (root / "latest").write_text("step_0000008")
    assert resolve_checkpoint("latest", tmp_path) == root / "step_0000004"  # a pointer to nothing does not
    (root / "step_0000004").rename(root / "step_0000004.old")
    (root / "latest").write_text("step_0000004")
    assert resolve_checkpoint("latest", tmp_path) == root / "step_0000004.old"


def test_ranges_saved_by_several_ranks_are_put_back_together_or_refused():
    """What resumes at another world size read (optimizer records, DeepSpeed's fp32 copies): any order of the saved
    ranges gives the whole tensor; a missing rank's range is refused, not filled with zeros."""
    whole = torch.arange(12.0).view(6, 2)
    assert torch.equal(assemble_ranges([(4, whole[4:]), (0, whole[:4])], 6, what="rows"), whole)
    with pytest.raises(ValueError, match="rows misses 2 of 6"):
        assemble_ranges([(0, whole[:4])], 6, what="rows")
    with pytest.raises(ValueError, match="no rows"):
        assemble_ranges([], 6, what="rows")


def test_fault_specs_parse_and_select_ranks():
    plan = FaultPlan(parse_faults("nan_loss:5-7;kill:9:rank=1; inf_grad:3,11:rank=0"), rank=0)
    assert [(f.kind, sorted(f.attempts)) for f in plan.faults] == [("nan_loss", [5, 6, 7]), ("inf_grad", [3, 11])]
    loss = torch.tensor(2.0, requires_grad=True)
    assert torch.isnan(plan.corrupt_loss(loss, 6)) and plan.corrupt_loss(loss, 4) is loss
    poisoned = plan.corrupt_loss(loss * 1.0, 11)
    poisoned.backward()
    assert torch.isfinite(poisoned) and not torch.isfinite(loss.grad)
    for bad in ("explode:5", "kill", "kill:x", "kill:5:node=1"):
        with pytest.raises(ValueError, match="RELORA_INJECT_FAULTS"):
            parse_faults(bad)
