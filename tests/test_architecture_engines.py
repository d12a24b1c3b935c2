"""The methods that build another architecture (CoLA, CoLA-M, CR-Net) on the engines: 2 gloo ranks against the
single-process run on the same global batches (same losses and exported model, 1e-5 in fp32) with weight decay and
clipping, exact resume, resume at another world size, bf16, --compile, their own recomputation and a NaN skipped.
Every engine with the methods' defaults: tests/test_methods_on_engines.py; here the engines that split or gather
parameters (ZeRO-2/3, FSDP2) and DDP. The three methods' 2-rank runs share one launch, their 1-rank runs another
(tests/dist/method_runs.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (ENGINE_FLAGS, SMALL, distance, exported, for_method, initial_weights, launch_runs, max_relative_difference,
                      read_metrics, run_case)
import relora_dist  # noqa: F401  (registers the architectures with the Auto classes)

pytestmark = pytest.mark.dist

METHODS = ["cola", "cola_m", "crnet"]
RUN = ["--steps", "10", "--lr", "0.01", "--grad-clip", "0.5", "--weight-decay", "0.01"]
FP32_ENGINES = {name: ENGINE_FLAGS[name] for name in ("ddp", "zero2", "zero3", "fsdp2")}
BF16_ENGINES = ("zero0", "zero1", "zero2", "zero3", "fsdp2")
BF16_FLAGS = {name: ENGINE_FLAGS[name] for name in BF16_ENGINES}
HOPS = ("ddp", "fsdp2", "zero3")  # stopped on 2 ranks, resumed on 1
# A method's own recomputation, on the engines that gather parameters per layer (and DDP, ZeRO-2): the same run.
RECOMPUTE = {"crnet": ["--crnet-recompute-every", "2"]}
RECOMPUTE_ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def method_cases(method, tmp_path) -> tuple[list, list]:
    """(2-rank cases, 1-rank cases) of one method, its runs in tmp_path."""
    two_rank = [run_case(name, tmp_path, *flags) for name, flags in FP32_ENGINES.items()]
    two_rank += [run_case(f"{name}-bf16", tmp_path, *BF16_FLAGS[name], "--dtype", "bf16") for name in BF16_ENGINES]
    two_rank += [run_case(f"{name}-hop", tmp_path, *FP32_ENGINES[name], "--stop-after", "5", "--save-every", "5", export=False)
                 for name in HOPS]
    two_rank += [run_case("ddp-split", tmp_path, "--stop-after", "6", "--save-every", "3", export=False),
                 run_case("ddp-split", tmp_path, "--resume"),
                 run_case("ddp-nan", tmp_path, "--check-replicas", "true", env={"RELORA_INJECT_FAULTS": "nan_loss:4:rank=1"})]
    recomputed = [f"{name}-recompute" for name in RECOMPUTE_ENGINES] if method in RECOMPUTE else []
    two_rank += [run_case(name, tmp_path, *FP32_ENGINES[name.removesuffix("-recompute")], *RECOMPUTE[method])
                 for name in recomputed]
    one_rank = [run_case("reference", tmp_path, "--micro-batch-size", "4"), run_case("reference-bf16", tmp_path, "--dtype", "bf16"),
                run_case("compiled", tmp_path, "--compile", "true")]
    one_rank += [run_case(f"{name}-hop", tmp_path, *FP32_ENGINES[name], "--resume") for name in HOPS]
    return for_method(two_rank, method), for_method(one_rank, method)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """Every method's runs: the 2-rank ones in one launch, then the 1-rank ones in another."""
    root = tmp_path_factory.mktemp("engines")
    cases = [method_cases(method, root / method) for method in METHODS]
    common = SMALL + RUN + ["--micro-batch-size", "2"]
    launch_runs([case for two_rank, _ in cases for case in two_rank], common, nproc=2, tmp_path=root)
    launch_runs([case for _, one_rank in cases for case in one_rank], common, nproc=1, tmp_path=root)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_every_engine_equals_the_single_process_run_and_resumes(engine_runs, method):
    tmp_path = engine_runs / method
    recomputed = [f"{name}-recompute" for name in RECOMPUTE_ENGINES] if method in RECOMPUTE else []
    reference = tmp_path / "reference"
    losses = [m["loss"] for m in read_metrics(reference)]
    assert len(losses) == 10 and losses[-1] < losses[0]
    for name in [*FP32_ENGINES, *(f"{n}-hop" for n in HOPS), "ddp-split", "compiled"]:
        assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(losses, rel=1e-5), name
        assert max_relative_difference(exported(reference / "hf"), exported(tmp_path / name / "hf")) < 1e-5, name
    for name in recomputed:  # the inverse's rounding (1e-6 a backward) carried through 10 updates
        assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(losses, rel=1e-5), name
        assert max_relative_difference(exported(reference / "hf"), exported(tmp_path / name / "hf")) < 1e-4, name
    assert exported(tmp_path / "ddp-split" / "hf").keys() == exported(tmp_path / "ddp" / "hf").keys()
    assert max_relative_difference(exported(tmp_path / "ddp" / "hf"), exported(tmp_path / "ddp-split" / "hf")) == 0.0
    # bf16: the same losses to 3e-2, and the trained weights within a fifth of the distance training moved them (Adam
    # turns bf16 rounding into +-lr steps; measured: 1-2% on ZeRO-1/2/3 and FSDP2, 12% on ZeRO-0, which accumulates
    # and all-reduces its gradients in bf16).
    fp32 = exported(reference / "hf")
    travelled = distance(initial_weights(reference), fp32)
    for name in ("reference", *BF16_ENGINES):
        run = tmp_path / f"{name}-bf16"
        assert [m["loss"] for m in read_metrics(run)] == pytest.approx(losses, rel=3e-2), name
        assert distance(exported(run / "hf"), fp32) < 0.2 * travelled, name
    nan_run = json.loads((tmp_path / "ddp-nan" / "summary.json").read_text())
    assert nan_run["skipped"] == 1 and nan_run["steps"] == 10


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """3 updates of each method with a merged export, one launch."""
    tmp_path = tmp_path_factory.mktemp("short")
    launch_runs([run_case(method, tmp_path, "--method", method) for method in METHODS], SMALL + ["--steps", "3"], nproc=1,
                tmp_path=tmp_path)
    return tmp_path


@pytest.mark.parametrize("method", METHODS)
def test_the_export_loads_with_transformers_auto_class_and_gives_the_trained_logits(short_runs, method):
    run = short_runs / method
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert model.config.model_type == method
    latest = (run / "checkpoints" / "latest").read_text().strip()
    trained = torch.load(run / "checkpoints" / latest / "model.pt", weights_only=True)
    assert set(trained) == set(model.state_dict())
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    rebuilt = AutoModelForCausalLM.from_config(model.config)
    rebuilt.load_state_dict(trained)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, rebuilt(input_ids=tokens).logits)
