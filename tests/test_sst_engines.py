"""SST on every engine beyond the generic test (tests/test_methods_on_engines.py, which holds every engine to the
single-process run at SST's defaults with its events shortened): with --check-replicas (the active components S,
the bases and the method's random stream identical on every rank), ZeRO-3 with every parameter partitioned, exact
resume (2 ranks -> 2 on DDP and ZeRO-2, 2 -> 1 on FSDP2 and ZeRO-3, 1 -> 2 on ZeRO-1), a rank killed after a
checkpoint (FSDP2), the dense forward (--sst-forward dense) on FSDP2 and ZeRO-3, bf16, and bf16's exact copies of the
bases. A resample every 2 updates and a re-SVD at update 4 (each run stops at 3 or goes through 6).
All 2-rank runs share one launch (tests/dist/method_runs.py).

DeepSpeed in bf16 keeps U and V exact in fp32 copies beside its bf16 params (resamples and re-SVDs write them): at an
LR of 1e-30 only the events move anything, so 2-rank ZeRO-2 and ZeRO-3 in bf16 export what one process does (ZeRO-2
in bf16 at world size 1: the dense parameters rounded alike), and the copies a checkpoint holds after the re-SVD are
orthonormal (bf16 bases: ~1e-2) and are what the bf16 parameters are rounded from."""

import json

import pytest
import torch

from relora_dist.backends.deepspeed.checkpoint import saved_frozen_parameters
from relora_dist.backends.deepspeed.fp32_copies import saved_shadows

from conftest import (ENGINE_FLAGS, SMALL, distance, exported, initial_weights, launch_runs, max_relative_difference,
                      read_metrics, run_case, run_cli)

pytestmark = pytest.mark.dist

RUN = ["--method", "sst", "--steps", "6", "--lr", "0.01", "--grad-clip", "0.5", "--weight-decay", "0.01",
       "--sst-iteration-steps", "2", "--sst-round-iterations", "2", "--sst-restart-warmup", "1"]
UNEVEN = {"hidden_size": 36, "intermediate_size": 91, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
STOP = ("--stop-after", "3", "--save-every", "3")  # between the first resample and the re-SVD
HOPS = ("fsdp2", "zero3-partitioned")  # stopped on 2 ranks, resumed on 1
SPLITS = ("ddp", "zero2")  # stopped and resumed on 2 ranks
STILL_RUN = ["--lr", "1e-30", "--save-every", "4", "--keep-checkpoints", "3"]
STILL = ("zero2", "zero3-partitioned")  # bf16 at LR 1e-30: only the events move U and V
BF16 = ("zero0", "zero1", "zero3", "fsdp2")  # ZeRO-0: replicated fp32 masters; ZeRO-1: partitioned ones
DENSE = ("zero3-partitioned", "fsdp2")  # W rebuilt in the forward


def test_sst_on_every_engine_checks_its_replicas_resumes_and_keeps_its_bases_exact_in_bf16(tmp_path):
    config = tmp_path / "uneven.json"
    config.write_text(json.dumps(UNEVEN))
    partitioned = tmp_path / "zero3_partitioned.json"  # every parameter partitioned (the shipped config keeps small ones whole)
    partitioned.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    flags = ENGINE_FLAGS | {"zero3-partitioned": ["--deepspeed", partitioned]}
    common = SMALL + RUN + ["--micro-batch-size", "2", "--model-config", config]
    launch_runs([run_case("reference", tmp_path, "--micro-batch-size", "4"),
                 run_case("still-reference", tmp_path, *flags["zero2"], "--dtype", "bf16", *STILL_RUN),
                 run_case("reference-dense", tmp_path, "--micro-batch-size", "4", "--sst-forward", "dense"),
                 run_case("zero1-grow", tmp_path, *flags["zero1"], *STOP, export=False)], common, nproc=1, tmp_path=tmp_path)
    # rank 1 killed at update 5, after the checkpoint of update 3: the resume redoes the re-SVD and resample of 4
    killed = run_cli(common + [*flags["fsdp2"], "--save-every", "3", "--out", tmp_path / "fsdp2-killed"], nproc=2,
                     check=False, env={"RELORA_INJECT_FAULTS": "kill:5:rank=1"})
    assert killed.returncode != 0
    assert (tmp_path / "fsdp2-killed" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    checked = ("--check-replicas", "true")
    two_rank = [run_case("zero3-partitioned", tmp_path, *flags["zero3-partitioned"], *checked)]
    two_rank += [run_case(f"{name}-split", tmp_path, *flags[name], *checked, *STOP, export=False) for name in SPLITS]
    two_rank += [run_case(f"{name}-split", tmp_path, *flags[name], *checked, "--resume") for name in SPLITS]
    two_rank += [run_case(f"{name}-hop", tmp_path, *flags[name], *checked, *STOP, export=False) for name in HOPS]
    two_rank += [run_case("zero1-grow", tmp_path, *flags["zero1"], *checked, "--resume"),
                 run_case("fsdp2-killed", tmp_path, *flags["fsdp2"], "--resume")]
    two_rank += [run_case(f"{name}-bf16", tmp_path, *flags[name], "--dtype", "bf16", *checked) for name in BF16]
    two_rank += [run_case(f"{name}-dense", tmp_path, *flags[name], "--sst-forward", "dense", *checked) for name in DENSE]
    two_rank += [run_case(f"{name}-still", tmp_path, *flags[name], "--dtype", "bf16", *STILL_RUN, *checked)
                 for name in STILL]
    launch_runs(two_rank, common, nproc=2, tmp_path=tmp_path)
    launch_runs([run_case(f"{name}-hop", tmp_path, *flags[name], "--resume") for name in HOPS], common, nproc=1,
                tmp_path=tmp_path)

    records = read_metrics(tmp_path / "reference")
    assert [m.get("events") for m in records] == [None, ["resample"], None, ["resvd", "resample"], None, None]
    assert [m["lr"] == 0 for m in records] == [True, False, True, False, True, False]  # warm-up, then jagged restarts
    expected = [m["loss"] for m in records]
    weights = exported(tmp_path / "reference" / "hf")
    for name in ["zero3-partitioned", *(f"{n}-split" for n in SPLITS), *(f"{n}-hop" for n in HOPS), "zero1-grow",
                 "fsdp2-killed"]:
        assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(expected, rel=1e-5), name
        difference = max_relative_difference(weights, exported(tmp_path / name / "hf"))
        assert difference < 1e-5, (name, difference)
    dense = exported(tmp_path / "reference-dense" / "hf")  # the same arithmetic in another order
    assert max_relative_difference(weights, dense) < 1e-5
    for name in DENSE:
        assert max_relative_difference(dense, exported(tmp_path / f"{name}-dense" / "hf")) < 1e-5, name
    travelled = distance(initial_weights(tmp_path / "reference"), weights)
    for name in BF16:  # bf16 rounding: within a fifth of the distance training moved the weights
        bf16 = tmp_path / f"{name}-bf16"
        assert [m["loss"] for m in read_metrics(bf16)] == pytest.approx(expected, rel=3e-2), name
        assert distance(weights, exported(bf16 / "hf")) < 0.2 * travelled, name

    still = exported(tmp_path / "still-reference" / "hf")
    for name in STILL:
        run = tmp_path / f"{name}-still"
        difference = max_relative_difference(still, exported(run / "hf"))
        assert difference < 1e-5, (name, difference)
        checkpoint = run / "checkpoints" / "step_0000004"  # right after the re-SVD
        exact, frozen = saved_shadows(checkpoint), saved_frozen_parameters(checkpoint)
        assert exact and sorted(exact) == sorted(k for k in frozen if k.endswith((".U", ".V"))), name
        for key, values in exact.items():
            assert frozen[key].dtype == torch.bfloat16 and torch.equal(values.to(torch.bfloat16), frozen[key].reshape(-1)), key
            basis = values.view(frozen[key].shape)
            assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5), key  # bf16: ~1e-2
