"""2-rank DDP (gloo, real processes) against a single-process run on the same global batches."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL, killed_run, launch_runs, load_run, max_relative_difference, run_case, run_cli

pytestmark = pytest.mark.dist

RELORA = ["--method", "relora", "--steps", "12", "--warm-start-steps", "3", "--merge-every", "3",
          "--restart-warmup-steps", "1"]


PRUNES = ["magnitude", "random"]


@pytest.fixture(scope="module")
def prune_runs(tmp_path_factory):
    """Each prune rule on 2 ranks (one launch) and on one process (another)."""
    root = tmp_path_factory.mktemp("prune")
    common = SMALL + RELORA + ["--prune-ratio", "0.8"]
    launch_runs([run_case(f"{prune}/ddp", root, "--prune", prune, "--check-replicas", "true", "--report-to", "tensorboard",
                          export=False) for prune in PRUNES], common, nproc=2, tmp_path=root)
    # Different micro-batch split on purpose: the global batches must not depend on it.
    launch_runs([run_case(f"{prune}/single", root, "--prune", prune, "--micro-batch-size", "4", export=False)
                 for prune in PRUNES], common, nproc=1, tmp_path=root)
    return root


@pytest.mark.parametrize("prune", PRUNES)
def test_two_ranks_equal_single_process_after_two_merges_and_resets(prune_runs, prune):
    tmp_path = prune_runs / prune
    ddp_summary, ddp_metrics, ddp_state = load_run(tmp_path / "ddp")
    ref_summary, ref_metrics, ref_state = load_run(tmp_path / "single")
    assert ddp_summary["world_size"] == 2 and ref_summary["world_size"] == 1
    assert ddp_summary["merges"] == ref_summary["merges"] == 2
    assert ddp_summary["resets"] == ref_summary["resets"] == 2
    merges = [m for m in ddp_metrics if m.get("merge_s") is not None]
    assert [m["step"] for m in merges] == [7, 10] and all(m["lr"] == 0.0 for m in merges)  # I5
    assert max_relative_difference(ref_state, ddp_state) < 1e-5
    assert ddp_summary["val_loss"] == pytest.approx(ref_summary["val_loss"], rel=1e-5)  # same held-out set
    for a, b in zip(ddp_metrics, ref_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # --report-to from rank 0 alone: one event file, every update once, the logged losses and memory columns
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "ddp" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(m["step"], pytest.approx(m["loss"], rel=1e-6))
                                                                          for m in ddp_metrics]
    assert all(m["rss_gib"] > 0 and m["mfu"] > 0 for m in ddp_metrics)


def test_replica_check_detects_a_diverged_rank():
    """The I3 check used by --check-replicas must be able to fail."""
    script = REPO / "tests" / "dist" / "replica_divergence.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "detected: ['diverged']" in out.stdout


INVARIANT_CASES = [("magnitude", "fp32"), ("random", "fp32"), ("reset", "fp32"), ("magnitude", "bf16")]


@pytest.fixture(scope="module")
def invariants_output():
    """I1-I4 after three merges/resets on DDP, every case in one launch (tests/dist/invariants.py)."""
    script = REPO / "tests" / "dist" / "invariants.py"
    cases = ",".join(f"{prune}:{dtype}" for prune, dtype in INVARIANT_CASES)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                          "--backend", "ddp", "--cases", cases],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("prune, dtype", INVARIANT_CASES)
def test_invariants_on_two_rank_ddp(invariants_output, prune, dtype):
    """Against a single-process reference on the same global batches."""
    assert f"INVARIANTS OK backend=ddp dtype={dtype} prune={prune} world=2 restarts=3" in invariants_output


def test_two_rank_resume_mid_cycle_and_at_another_world_size(tmp_path):
    """I6 on DDP: 2 ranks with one SIGKILLed at a random update end promptly, and resumed on 2 ranks equal the
    uninterrupted run bit for bit; stopped and resumed on 1 rank (same global batches) they agree to float tolerance."""
    common = SMALL + RELORA
    launch_runs([run_case("whole", tmp_path, export=False), run_case("other", tmp_path, "--stop-after", "8", export=False)],
                common, nproc=2, tmp_path=tmp_path)
    fault = killed_run(common, tmp_path / "split")
    run_cli(common + ["--out", tmp_path / "split", "--resume"], nproc=2)
    run_cli(common + ["--out", tmp_path / "other", "--resume"])
    whole_summary, whole_metrics, whole_state = load_run(tmp_path / "whole")
    split_summary, split_metrics, split_state = load_run(tmp_path / "split")
    other_summary, _, other_state = load_run(tmp_path / "other")
    assert split_summary["merges"] == whole_summary["merges"] == other_summary["merges"] == 2
    assert [m["loss"] for m in split_metrics] == [m["loss"] for m in whole_metrics], fault
    assert all(torch.equal(whole_state[k], split_state[k]) for k in whole_state), fault
    assert other_summary["world_size"] == 1
    assert max_relative_difference(whole_state, other_state) < 1e-5
