"""SwitchLoRA on every engine: 2 gloo ranks against the single-process run on the same global batches (same losses
and exported model) with a switch before every update (r / interval = 2 vectors a side, clamped by what is
available; freezes of 1 update), on the uneven model of the GaLore tests (FSDP2's row shards uneven, ZeRO's
partition boundaries inside rows); exact resume, resume at another world size (2 -> 1 ranks on DDP, FSDP2 and
ZeRO-3, 1 -> 2 on ZeRO-1: the per-element step counters travel beside DeepSpeed's universal checkpoint), bf16,
replica checks, a warm start. All 2-rank runs share one launch (tests/dist/method_runs.py).

DeepSpeed in bf16 keeps W and the pools exact in fp32 copies beside its bf16 params: at an LR of 1e-30 only the
switches move them, and every switch preserves W + s·B@A, so 10 updates on every ZeRO stage export what one update
did; the bf16 W DeepSpeed saves is the rounded copy."""

import json

import pytest
import torch

from relora_dist.backends.deepspeed.backend import DeepSpeedBackend
from relora_dist.backends.deepspeed.checkpoint import saved_frozen_parameters
from relora_dist.backends.deepspeed.fp32_copies import saved_shadows
from relora_dist.export import export_checkpoint

from conftest import (ENGINE_FLAGS, SMALL, distance, exported, initial_weights, launch_runs, max_relative_difference,
                      read_metrics, run_case)

pytestmark = pytest.mark.dist

RUN = ["--method", "switchlora", "--steps", "10", "--lr", "0.01", "--grad-clip", "0.5", "--weight-decay", "0.01",
       "--switchlora-interval", "2", "--switchlora-freeze-steps", "1", "--switchlora-descent-rate", "100"]
UNEVEN = {"hidden_size": 36, "intermediate_size": 91, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
ENGINES = tuple(ENGINE_FLAGS)  # every engine
HOPS = ("ddp", "fsdp2", "zero3")  # stopped on 2 ranks, resumed on 1
GROWS = ("zero1",)  # stopped on 1 rank, resumed on 2
STILL_RUN = ["--dtype", "bf16", "--lr", "1e-30"]
BF16 = ("zero0", "zero2", "zero3", "fsdp2")  # DeepSpeed: bf16 W rounded from an fp32 copy; FSDP2: the sharded W is fp32
STILL = ("zero0", "zero1", "zero2", "zero3", "zero3-partitioned")  # bf16 at LR 1e-30: only the switches move W


def test_every_engine_equals_the_single_process_run_and_resumes(tmp_path):
    config = tmp_path / "uneven.json"
    config.write_text(json.dumps(UNEVEN))
    common = SMALL + RUN + ["--micro-batch-size", "2", "--model-config", config]
    one_rank = [run_case("reference", tmp_path, "--micro-batch-size", "4"),
                run_case("reference-warm", tmp_path, "--micro-batch-size", "4", "--switchlora-warm-start-steps", "3")]
    one_rank += [run_case(f"{name}-grow", tmp_path, *ENGINE_FLAGS[name], "--stop-after", "5", "--save-every", "5",
                          export=False) for name in GROWS]
    one_rank += [run_case("still-reference", tmp_path, *ENGINE_FLAGS["zero2"], *STILL_RUN, "--stop-after", "1",
                          "--save-every", "1", export=False)]
    launch_runs(one_rank, common, nproc=1, tmp_path=tmp_path)
    two_rank = [run_case(name, tmp_path, *ENGINE_FLAGS[name], "--check-replicas", "true") for name in ENGINES]
    # ZeRO-3 keeps parameters under 1e5 elements whole (the shipped config): here every one is partitioned, W and pools too
    partitioned = tmp_path / "zero3_partitioned.json"
    partitioned.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    flags = ENGINE_FLAGS | {"zero3-partitioned": ["--deepspeed", partitioned]}
    two_rank += [run_case("zero3-partitioned", tmp_path, *flags["zero3-partitioned"])]
    two_rank += [run_case(f"{name}-bf16", tmp_path, *ENGINE_FLAGS[name], "--dtype", "bf16", "--check-replicas", "true")
                 for name in BF16]
    two_rank += [run_case(f"{name}-still", tmp_path, *flags[name], *STILL_RUN, "--check-replicas", "true") for name in STILL]
    # the fp32 copies resume on 2 ranks and on 1 (reassembled from the saved ranks' partitions)
    stopped = ("--stop-after", "4", "--save-every", "4")
    two_rank += [run_case("zero2-still-split", tmp_path, *flags["zero2"], *STILL_RUN, *stopped, export=False),
                 run_case("zero2-still-split", tmp_path, *flags["zero2"], *STILL_RUN, "--resume"),
                 run_case("zero3-partitioned-still-hop", tmp_path, *flags["zero3-partitioned"], *STILL_RUN, *stopped,
                          export=False)]
    two_rank += [run_case(f"{name}-hop", tmp_path, *ENGINE_FLAGS[name], "--stop-after", "5", "--save-every", "5", export=False)
                 for name in HOPS]
    two_rank += [run_case("ddp-split", tmp_path, "--stop-after", "6", "--save-every", "3", export=False),
                 run_case("ddp-split", tmp_path, "--resume"),
                 run_case("zero2-split", tmp_path, *ENGINE_FLAGS["zero2"], "--stop-after", "4", "--save-every", "4",
                          export=False),
                 run_case("zero2-split", tmp_path, *ENGINE_FLAGS["zero2"], "--resume"),
                 run_case("warm", tmp_path, "--switchlora-warm-start-steps", "3")]
    two_rank += [run_case(f"{name}-grow", tmp_path, *ENGINE_FLAGS[name], "--resume") for name in GROWS]
    launch_runs(two_rank, common, nproc=2, tmp_path=tmp_path)
    launch_runs([run_case(f"{name}-hop", tmp_path, *ENGINE_FLAGS[name], "--resume") for name in HOPS]
                + [run_case("zero3-partitioned-still-hop", tmp_path, *flags["zero3-partitioned"], *STILL_RUN, "--resume")],
                common, nproc=1, tmp_path=tmp_path)

    records = read_metrics(tmp_path / "reference")
    losses = [m["loss"] for m in records]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert sum(m["switched"] for m in records) >= 4 * 10  # vectors did switch, in every layer, most updates
    assert all("events" not in m for m in records)  # routine: not marked update by update
    resumed = ["ddp-split", "zero2-split", *(f"{n}-hop" for n in HOPS), *(f"{n}-grow" for n in GROWS)]
    runs_like_reference = [*ENGINES, "zero3-partitioned", *resumed]
    for reference, runs in {"reference": runs_like_reference, "reference-warm": ["warm"]}.items():
        expected = [m["loss"] for m in read_metrics(tmp_path / reference)]
        for name in runs:
            assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(expected, rel=1e-5), name
            difference = max_relative_difference(exported(tmp_path / reference / "hf"), exported(tmp_path / name / "hf"))
            assert difference < 1e-5, (name, difference)
    warm = read_metrics(tmp_path / "reference-warm")
    assert [m["low_rank"] for m in warm] == [False] * 2 + [True] * 8 and warm[2]["events"] == ["wrap"]
    travelled = distance(initial_weights(tmp_path / "reference"), exported(tmp_path / "reference" / "hf"))
    for name in BF16:  # bf16 rounding: within a fifth of the distance training moved the weights
        fp32, bf16 = tmp_path / name, tmp_path / f"{name}-bf16"
        assert [m["loss"] for m in read_metrics(bf16)] == pytest.approx([m["loss"] for m in read_metrics(fp32)], rel=3e-2), name
        assert distance(exported(fp32 / "hf"), exported(bf16 / "hf")) < 0.2 * travelled, name

    # bf16 W exact: 9 more switches on 2 ranks export what the first update did (bf16 folds would drift by ~1e-3)
    expected = exported(export_checkpoint(latest_checkpoint(tmp_path / "still-reference"), tmp_path / "still-hf"))
    for run in [tmp_path / f"{name}-still" for name in STILL] + [tmp_path / "zero2-still-split", tmp_path / "zero3-partitioned-still-hop"]:
        name = run.name
        assert sum(m["switched"] for m in read_metrics(run)[1:]) >= 4 * 9, name
        difference = max_relative_difference(expected, exported(run / "hf"))
        assert difference < 1e-5, (name, difference)
        exact, frozen = saved_shadows(latest_checkpoint(run)), saved_frozen_parameters(latest_checkpoint(run))
        assert sorted(exact) == sorted(k for k in frozen if k.endswith((".weight", ".candidates_A", ".candidates_B"))
                                       and ("self_attn" in k or "mlp" in k)), name
        for key, values in exact.items():  # what the forward used: the copy rounded once
            assert frozen[key].dtype == torch.bfloat16 and torch.equal(values.to(torch.bfloat16), frozen[key].reshape(-1)), key
    # and the same vectors switched in on every engine: factors (fp32 masters) and pools, from the checkpoints
    states = {name: DeepSpeedBackend.read_checkpoint_model(latest_checkpoint(tmp_path / f"{name}-still")) for name in STILL}
    for name, state in states.items():
        assert max_relative_difference(states["zero3"], state) < 1e-5, name


def latest_checkpoint(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
