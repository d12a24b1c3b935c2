"""FSDP2 (`fully_shard`): real engines on 2 gloo ranks under torchrun, against a single-process torch
reference on the same global batches."""

import json
import subprocess
import sys

import pytest

from conftest import (REPO, RELORA_RUN, SMALL, assert_run_equals_reference, exported, killed_run, launch_env, launch_runs,
                      max_relative_difference, read_metrics, run_case, run_cli)
from relora_dist.cli.train import export_main

pytestmark = pytest.mark.dist

# {backend}-{dtype}-{prune}[-flags]: see tests/dist/sharded_checks.py. One launch for all of them.
FSDP2_CASES = ["fsdp2-fp32-magnitude", "fsdp2-fp32-random", "fsdp2-bf16-magnitude", "fsdp2-fp32-reset-r1",
               "fsdp2-fp32-magnitude-noreshard-gathered"]


def run_sharded_checks(cases: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist" / "sharded_checks.py"), "--cases", ",".join(cases)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env())
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    for case in cases:
        assert f"CASE OK {case} " in out.stdout, out.stdout[-3000:]
    return out.stdout


def test_fsdp2_resets_are_exact_move_only_lora_bytes_and_match_the_reference():
    """Uneven rows, r < world (an empty A shard), bf16 mixed precision, params left gathered by an eval forward:
    the state after each reset equals the expectation bit for bit; the reset is one all_to_all plus tiny
    all-reduces (no all-gather, so no W); fp32 runs equal the torch reference after resets and steps."""
    run_sharded_checks(FSDP2_CASES)


def test_fsdp2_run_equals_single_process_and_resumes_at_other_world_sizes(tmp_path, reference_run):
    """relora-train --backend fsdp2 on 2 ranks equals the single-process run (merges at LR 0, I5); a run with
    one rank SIGKILLed at a random update ends promptly and resumes bit for bit on 2 (I6); one resumed
    2 -> 1 -> 2 ranks through torch.distributed.checkpoint ends at the same model; relora-export reads the
    DCP checkpoint offline."""
    common = SMALL + RELORA_RUN + ["--backend", "fsdp2"]
    launch_runs([run_case("whole", tmp_path), run_case("hop", tmp_path, "--stop-after", "5", export=False)], common, nproc=2,
                tmp_path=tmp_path)
    fault = killed_run(common, tmp_path / "split")
    launch_runs([run_case("hop", tmp_path, "--resume", "--stop-after", "9", export=False)], common, nproc=1, tmp_path=tmp_path)
    launch_runs([run_case("split", tmp_path, "--resume"), run_case("hop", tmp_path, "--resume")], common, nproc=2,
                tmp_path=tmp_path)

    assert_run_equals_reference(tmp_path / "whole", reference_run, "fsdp2")
    assert [m["loss"] for m in read_metrics(tmp_path / "split")] == [m["loss"] for m in read_metrics(tmp_path / "whole")], fault
    assert max_relative_difference(exported(tmp_path / "whole" / "hf"), exported(tmp_path / "split" / "hf")) == 0.0, fault
    hop = json.loads((tmp_path / "hop" / "summary.json").read_text())
    assert hop["merges"] == 2 and hop["world_size"] == 2
    assert max_relative_difference(exported(tmp_path / "whole" / "hf"), exported(tmp_path / "hop" / "hf")) < 1e-5
    latest = (tmp_path / "whole" / "checkpoints" / "latest").read_text().strip()
    assert export_main([str(tmp_path / "whole" / "checkpoints" / latest), str(tmp_path / "offline")]) == 0
    assert max_relative_difference(exported(tmp_path / "whole" / "hf"), exported(tmp_path / "offline")) == 0.0


def test_fsdp2_bf16_with_activation_checkpointing_and_kept_gathers_through_the_cli(tmp_path):
    """bf16 mixed precision, activation checkpointing (recomputing shared LoRA inputs) and reshard_after_forward=false
    with evaluations (which leave parameters gathered) between resets, through the whole CLI."""
    run_cli(SMALL + RELORA_RUN + ["--backend", "fsdp2", "--dtype", "bf16", "--activation-checkpointing", "true",
                                  "--fsdp-reshard-after-forward", "false", "--eval-every", "3", "--out", tmp_path,
                                  "--check-replicas", "true", "--shared-lora-input", "true"], nproc=2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["merges"] == 2 and summary["val_loss"] < 7.0

