"""GaLore and Fira on DDP and the engines that split rows (ZeRO-1/2/3, FSDP2; every engine with the defaults:
tests/test_methods_on_engines.py): 2 gloo ranks against the single-process run on the same global batches (same losses
and exported model), with weight decay, clipping and real SVD refreshes at steps 0, 4 and 8, on a model whose shapes
make FSDP2's row shards uneven and put DeepSpeed's partition boundaries inside rows (hidden 36, ffn 91, 3 layers);
exact resume, resume at another world size (2 -> 1 ranks on DDP, FSDP2 and ZeRO-3, 1 -> 2 on ZeRO-1), bf16, the dense
parameters at another rate (--non-projection-lr-scale), replica checks (projectors included) and a NaN skipped. Every
engine runs the projection named: std (down_proj from the left, its row shards' partial products summed where FSDP2
and ZeRO split it) by default, and --galore-proj right equals the single-process right run on the engines that split
rows too, resumes at another world size included. Both methods' runs share three launches (1 rank, 2 ranks, the
resumes on 1 rank; tests/dist/method_runs.py)."""

import json
import shutil

import pytest

from conftest import (ENGINE_FLAGS, REPO, SMALL, distance, exported, for_method, initial_weights, launch_runs,
                      max_relative_difference, read_metrics, run_case, run_cli)

pytestmark = pytest.mark.dist

METHODS = ["galore", "fira"]
RUN = ["--steps", "10", "--lr", "0.01", "--grad-clip", "0.5", "--weight-decay", "0.01", "--galore-update-gap", "4"]
# Odd ffn: gate/up rows split unevenly on FSDP2 and cut by ZeRO-3's halves; 3 layers: ZeRO-1/2's boundary inside gate
UNEVEN = {"hidden_size": 36, "intermediate_size": 91, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
WHOLE = ("ddp",)  # every matrix whole in one optimizer (ZeRO-0, fairscale, ZeroRedundancyOptimizer: test_methods_on_engines)
SPLIT = ("fsdp2", "zero1", "zero2", "zero3")  # rows split across ranks: down_proj's R summed over them
HOPS = ("ddp", "fsdp2", "zero3")  # stopped on 2 ranks, resumed on 1
RIGHT = ("zero2",)  # --galore-proj right, 2 ranks throughout
RIGHT_HOPS = ("fsdp2", "zero3")  # --galore-proj right, stopped on 2 ranks, resumed on 1
SCALED = ["--non-projection-lr-scale", "4"]  # embeddings, head and norms at 4x: their own param groups on every engine
SCALED_ENGINES = ("zero2", "fsdp2")
GROWS = ("zero1",)  # stopped on 1 rank, resumed on 2
BF16 = ("zero0", "zero2", "zero3", "fsdp2")


def uneven_model(tmp_path) -> list:
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(UNEVEN))
    return ["--model-config", path]


def method_cases(method: str, tmp_path) -> tuple[list, list, list]:
    """One method's runs in tmp_path: (1-rank cases before the 2-rank ones, the 2-rank cases, 1-rank cases after)."""
    one_rank = [run_case("reference", tmp_path, "--micro-batch-size", "4"),
                run_case("reference-right", tmp_path, "--micro-batch-size", "4", "--galore-proj", "right"),
                run_case("reference-scaled", tmp_path, "--micro-batch-size", "4", *SCALED)]
    one_rank += [run_case(f"{name}-grow", tmp_path, *ENGINE_FLAGS[name], "--stop-after", "5", "--save-every", "5",
                          export=False) for name in GROWS]
    two_rank = [run_case(name, tmp_path, *ENGINE_FLAGS[name]) for name in WHOLE + SPLIT]
    two_rank += [run_case(f"{name}-bf16", tmp_path, *ENGINE_FLAGS[name], "--dtype", "bf16") for name in BF16]
    two_rank += [run_case(f"{name}-hop", tmp_path, *ENGINE_FLAGS[name], "--stop-after", "5", "--save-every", "5", export=False)
                 for name in HOPS]
    right = ["--galore-proj", "right"]
    two_rank += [run_case(f"{name}-right", tmp_path, *ENGINE_FLAGS[name], *right) for name in RIGHT]
    two_rank += [run_case(f"{name}-scaled", tmp_path, *ENGINE_FLAGS[name], *SCALED) for name in SCALED_ENGINES]
    two_rank += [run_case(f"{name}-right-hop", tmp_path, *ENGINE_FLAGS[name], *right, "--stop-after", "5", "--save-every",
                          "5", export=False) for name in RIGHT_HOPS]
    two_rank += [run_case("ddp-split", tmp_path, "--stop-after", "6", "--save-every", "3", export=False),
                 run_case("ddp-split", tmp_path, "--resume"),
                 run_case("zero2-split", tmp_path, *ENGINE_FLAGS["zero2"], "--stop-after", "5", "--save-every", "5", export=False),
                 run_case("zero2-split", tmp_path, *ENGINE_FLAGS["zero2"], "--resume"),
                 run_case("zero3-split", tmp_path, *ENGINE_FLAGS["zero3"], "--stop-after", "5", "--save-every", "5", export=False),
                 run_case("zero3-split", tmp_path, *ENGINE_FLAGS["zero3"], "--resume"),
                 run_case("fsdp2-checked", tmp_path, *ENGINE_FLAGS["fsdp2"], "--check-replicas", "true", export=False),
                 run_case("ddp-nan", tmp_path, "--check-replicas", "true", env={"RELORA_INJECT_FAULTS": "nan_loss:4:rank=1"})]
    two_rank += [run_case(f"{name}-grow", tmp_path, *ENGINE_FLAGS[name], "--resume") for name in GROWS]
    after = [run_case(f"{name}-hop", tmp_path, *ENGINE_FLAGS[name], "--resume") for name in HOPS]
    after += [run_case(f"{name}-right-hop", tmp_path, *ENGINE_FLAGS[name], *right, "--resume") for name in RIGHT_HOPS]
    return for_method(one_rank, method), for_method(two_rank, method), for_method(after, method)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """Both methods' runs in three launches: 1 rank, 2 ranks, then the resumes on 1 rank."""
    root = tmp_path_factory.mktemp("engines")
    common = SMALL + RUN + ["--micro-batch-size", "2", *uneven_model(root)]
    cases = [method_cases(method, root / method) for method in METHODS]
    launch_runs([case for before, _, _ in cases for case in before], common, nproc=1, tmp_path=root)
    launch_runs([case for _, two_rank, _ in cases for case in two_rank], common, nproc=2, tmp_path=root)
    # ZeRO keeps the state per partition: another world size rebuilds it from the per-matrix records saved beside
    # DeepSpeed's files; a checkpoint without them is refused in one line (the test below)
    for method in METHODS:
        shutil.copytree(root / method / "zero3-hop", root / method / "zero3-bare")
        for records in (root / method / "zero3-bare").glob("checkpoints/step_*/optimizer_rows_rank*.pt"):
            records.unlink()
    launch_runs([case for _, _, after in cases for case in after], common, nproc=1, tmp_path=root)
    return root, common


@pytest.mark.parametrize("method", METHODS)
def test_every_engine_equals_the_single_process_run_and_resumes(engine_runs, method):
    root, common = engine_runs
    tmp_path, common = root / method, common + ["--method", method]
    refused = run_cli(common + [*ENGINE_FLAGS["zero3"], "--resume", "--out", tmp_path / "zero3-bare"], check=False)
    assert refused.returncode != 0 and "cannot reshard; resume on 2 ranks" in refused.stderr, refused.stderr[-2000:]

    resumed = ["ddp-split", "zero2-split", "zero3-split", *(f"{name}-hop" for name in HOPS), *(f"{name}-grow" for name in GROWS)]
    right_runs = [*(f"{name}-right" for name in RIGHT), *(f"{name}-right-hop" for name in RIGHT_HOPS)]
    references = {"reference": [*WHOLE, *SPLIT, *resumed], "reference-right": right_runs,
                  "reference-scaled": [f"{name}-scaled" for name in SCALED_ENGINES]}
    for reference, runs in references.items():
        losses = [m["loss"] for m in read_metrics(tmp_path / reference)]
        assert len(losses) == 10 and losses[-1] < losses[0]
        for name in runs:
            assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(losses, rel=1e-5), name
            difference = max_relative_difference(exported(tmp_path / reference / "hf"), exported(tmp_path / name / "hf"))
            assert difference < 1e-5, (name, difference)
    # std and right differ (down_proj's side): an engine that ran right instead of std would fail above; so does
    # the dense parameters' rate
    for other in ("reference-right", "reference-scaled"):
        assert max_relative_difference(exported(tmp_path / "reference" / "hf"), exported(tmp_path / other / "hf")) > 1e-3
    assert max_relative_difference(exported(tmp_path / "ddp" / "hf"), exported(tmp_path / "ddp-split" / "hf")) == 0.0
    travelled = distance(initial_weights(tmp_path / "reference"), exported(tmp_path / "reference" / "hf"))
    for name in BF16:  # bf16 rounding turned into +-lr steps: within a fifth of the distance training moved the weights
        fp32, bf16 = tmp_path / "reference", tmp_path / f"{name}-bf16"
        assert [m["loss"] for m in read_metrics(bf16)] == pytest.approx([m["loss"] for m in read_metrics(fp32)], rel=3e-2), name
        assert distance(exported(fp32 / "hf"), exported(bf16 / "hf")) < 0.2 * travelled, name
    nan_run = json.loads((tmp_path / "ddp-nan" / "summary.json").read_text())
    assert nan_run["skipped"] == 1 and nan_run["steps"] == 10


def test_fsdp2_row_shards_with_uneven_rows_equal_whole_matrices_step_by_step():
    """P injected, 7 steps with refreshes at 0, 3, 6, rows split 4 + 3, 3 + 2 and 2 + 1, GaLore and Fira, std and right
    projection (tests/dist/galore_rows.py)."""
    result = run_cli([], nproc=2, script=REPO / "tests" / "dist" / "galore_rows.py")
    for residual in ("none", "fira"):
        for proj in ("std", "right"):
            assert f"GALORE ROWS {residual} {proj} max difference" in result.stdout, result.stdout[-2000:]
