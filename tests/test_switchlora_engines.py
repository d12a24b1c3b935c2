"""SwitchLoRA on the engines where every rank holds whole parameters: 2 gloo ranks against the single-process run on
the same global batches (same losses and exported model) with a switch before every update (r / interval = 2
vectors a side, clamped by what is available; freezes of 2 updates), on the uneven model of the GaLore tests; exact
resume, resume 2 -> 1 ranks, replica checks. All 2-rank runs share one launch (tests/dist/method_runs.py)."""

import json

import pytest

from conftest import (ENGINE_FLAGS, SMALL, exported, launch_runs, max_relative_difference, read_metrics, run_case,
                      run_cli)

RUN = ["--method", "switchlora", "--steps", "10", "--lr", "0.01", "--grad-clip", "0.5", "--weight-decay", "0.01",
       "--switchlora-interval", "2", "--switchlora-freeze-steps", "1", "--switchlora-descent-rate", "100"]
UNEVEN = {"hidden_size": 36, "intermediate_size": 91, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
WHOLE = ("ddp", "zero0", "fairscale", "zero_redundancy")


def test_every_whole_parameter_engine_equals_the_single_process_run_and_resumes(tmp_path):
    config = tmp_path / "uneven.json"
    config.write_text(json.dumps(UNEVEN))
    common = SMALL + RUN + ["--micro-batch-size", "2", "--model-config", config]
    two_rank = [run_case(name, tmp_path, *ENGINE_FLAGS[name], "--check-replicas", "true") for name in WHOLE]
    two_rank += [run_case("ddp-split", tmp_path, "--stop-after", "6", "--save-every", "3", export=False),
                 run_case("ddp-split", tmp_path, "--resume"),
                 run_case("zero0-split", tmp_path, *ENGINE_FLAGS["zero0"], "--stop-after", "4", "--save-every", "4",
                          export=False),
                 run_case("zero0-split", tmp_path, *ENGINE_FLAGS["zero0"], "--resume"),
                 run_case("ddp-hop", tmp_path, "--stop-after", "5", "--save-every", "5", export=False),
                 run_case("warm", tmp_path, "--switchlora-warm-start-steps", "3")]
    launch_runs(two_rank, common, nproc=2, tmp_path=tmp_path)
    one_rank = [run_case("reference", tmp_path, "--micro-batch-size", "4"),
                run_case("reference-warm", tmp_path, "--micro-batch-size", "4", "--switchlora-warm-start-steps", "3"),
                run_case("ddp-hop", tmp_path, "--resume")]
    launch_runs(one_rank, common, nproc=1, tmp_path=tmp_path)

    records = read_metrics(tmp_path / "reference")
    losses = [m["loss"] for m in records]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert sum(m["switched"] for m in records) >= 4 * 10  # vectors did switch, in every layer, most updates
    assert all("events" not in m for m in records)  # routine: not marked update by update
    for reference, runs in {"reference": [*WHOLE, "ddp-split", "zero0-split", "ddp-hop"], "reference-warm": ["warm"]}.items():
        expected = [m["loss"] for m in read_metrics(tmp_path / reference)]
        for name in runs:
            assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(expected, rel=1e-5), name
            difference = max_relative_difference(exported(tmp_path / reference / "hf"), exported(tmp_path / name / "hf"))
            assert difference < 1e-5, (name, difference)
    warm = read_metrics(tmp_path / "reference-warm")
    assert [m["low_rank"] for m in warm] == [False] * 2 + [True] * 8 and warm[2]["events"] == ["wrap"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_engines_that_split_parameters_are_refused_before_any_work(tmp_path, engine):
    result = run_cli(SMALL + ["--method", "switchlora", "--dry-run", "--out", tmp_path, *ENGINE_FLAGS[engine]], check=False)
    assert result.returncode != 0 and "--method switchlora runs where every rank holds whole parameters" in result.stderr, \
        result.stderr[-2000:]
