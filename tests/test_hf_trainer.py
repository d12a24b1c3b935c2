"""relora_dist's methods inside Hugging Face Trainer (relora_dist.integrations.transformers, examples/hf_trainer.py),
on the engines Trainer's accelerator builds, in real processes: 2 gloo ranks under torchrun against the 1-process
Trainer run on the same batches, fp32, merged exports to 1e-5; the 1-process Trainer run against relora-train's on
the same batches; resume from a Trainer checkpoint against the uninterrupted run; the refusals. Two launches in all
(tests/dist/hf_trainer_runs.py runs a launch's cases one after another)."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, distance, exported, launch_runs, max_relative_difference

RUNS = REPO / "tests" / "dist" / "hf_trainer_runs.py"
CONFIGS = REPO / "launch" / "configs"
# What makes each method's events fall inside 6 updates; clipping at 0.3 is active (gradient norms 0.45-0.6)
COMMON = ["--model", "debug", "--seq-len", "64", "--steps", "6", "--global-batch-size", "8", "--warmup-steps", "1",
          "--rank", "4", "--lora-dropout", "0", "--merge-every", "3", "--restart-warmup-steps", "1",
          "--galore-update-gap", "2", "--switchlora-interval", "2", "--switchlora-freeze-steps", "1", "--sst-iteration-steps", "2",
          "--sst-round-iterations", "2", "--sst-restart-warmup", "1", "--grad-clip", "0.3",
          "--eps", "1e-3"]  # as tests/conftest.py's SMALL: Adam's rounding amplified less
ENGINES = {"ddp": [], "zero2": ["--deepspeed", CONFIGS / "zero2.json"], "zero3": ["--deepspeed", CONFIGS / "zero3.json"],
           "fsdp2": ["--fsdp2"]}
ENGINE_NAMES = {"ddp": "ddp", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp2": "fsdp2"}
CASES = [("relora", "ddp"), ("relora", "zero2"), ("relora", "zero3"), ("relora", "fsdp2"), ("galore", "zero2"), ("galore", "zero3"),
         ("galore", "fsdp2"), ("switchlora", "zero2"), ("switchlora", "zero3"), ("sst", "zero2")]
# Resumed from the checkpoint before the last (every N updates): a merge, GaLore's projector refresh and SST's resample
# (its generator's draw) come after it
RESUMED = {("relora", "zero3"): 3, ("galore", "fsdp2"): 3, ("sst", "zero2"): 3}


def case(name, out: Path, *args, **extra) -> dict:
    return {"name": name, "args": [*args, "--out", out / name], **extra}


def run_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.dist
def test_methods_under_trainer_equal_one_process_on_deepspeed_and_fsdp2(tmp_path):
    one = [case(f"one/{m}", tmp_path, "--method", m, "--micro-batch-size", "4") for m in ("relora", "galore", "switchlora", "sst")]
    one.append(case("relora-train", tmp_path, "--method", "relora", "--micro-batch-size", "4", "--eval-every", "0",
                    "--progress", "false", "--export-merged", tmp_path / "relora-train" / "merged", relora_train=True))
    one += [case("warm-start", tmp_path, "--method", "relora", "--warm-start-steps", "2", refused="rebuilds the model mid-run"),
            case("help", tmp_path, "--help", refused="usage: hf_trainer.py", exit_code=0),
            case("bad-method", tmp_path, "--method", "nope", refused="invalid choice: 'nope'")]
    launch_runs(one, COMMON, nproc=1, tmp_path=tmp_path, script=RUNS)

    optimizer_section = tmp_path / "zero2_optimizer.json"
    optimizer_section.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    two = []
    for method, engine in CASES:
        save = ["--save-steps", RESUMED[method, engine], "--save-total-limit", "2"] if (method, engine) in RESUMED else []
        two.append(case(f"{method}/{engine}", tmp_path, "--method", method, "--micro-batch-size", "2", *ENGINES[engine], *save))
        if save:
            two.append(case(f"{method}/{engine}-resumed", tmp_path, "--method", method, "--micro-batch-size", "2",
                            *ENGINES[engine], *save, "--resume", resume_from=str(tmp_path / f"{method}/{engine}")))
    planted = "checkpoint-3/global_step3/zero_pp_rank_1_mp_rank_00_model_states.pt"
    two += [case("relora/zero3-planted", tmp_path, "--method", "relora", "--micro-batch-size", "2", *ENGINES["zero3"],
                 "--save-steps", "3", "--resume", resume_from=str(tmp_path / "relora/zero3"), plant=planted,
                 refused=f"checkpoint file {tmp_path / 'relora/zero3-planted' / planted} is not plain data (it names posix.system)"),
            case("relora/zero2-bf16", tmp_path, "--method", "relora", "--micro-batch-size", "2", *ENGINES["zero2"], "--bf16"),
            case("fsdp2-on-cpu", tmp_path, "--method", "relora", "--micro-batch-size", "2", "--fsdp2", cpu_fsdp2=False,
                 refused="FSDP2 was asked for, but accelerate built MULTI_CPU instead"),
            case("ds-optimizer", tmp_path, "--method", "relora", "--micro-batch-size", "2", "--deepspeed", optimizer_section,
                 refused="the DeepSpeed config has a 'optimizer' section")]
    launch_runs(two, COMMON, nproc=2, tmp_path=tmp_path, script=RUNS)

    # The 1-process Trainer run is relora-train's on the same batches, bit for bit; its merged export is a plain model
    assert max_relative_difference(exported(tmp_path / "relora-train" / "merged"), exported(tmp_path / "one/relora/merged")) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "one/relora/merged")
    assert type(loaded).__name__ == "LlamaForCausalLM" and max_relative_difference(
        exported(tmp_path / "one/relora/merged"), {k: v.detach() for k, v in loaded.state_dict().items()}) == 0
    for method, engine in CASES:
        out = tmp_path / f"{method}/{engine}"
        record = run_record(out)
        assert (record["engine"], record["world_size"]) == (ENGINE_NAMES[engine], 2), (method, engine)
        reference = exported(tmp_path / f"one/{method}/merged")
        assert max_relative_difference(reference, exported(out / "merged")) < 1e-5, (method, engine)
        if (method, engine) in RESUMED:  # resumed from the checkpoint before the last: the uninterrupted run
            resumed = tmp_path / f"{method}/{engine}-resumed"
            assert max_relative_difference(exported(out / "merged"), exported(resumed / "merged")) < 1e-6, (method, engine)
            every = RESUMED[method, engine]
            assert run_record(resumed)["resumed_from"] == str(resumed / f"checkpoint-{5 // every * every}")
            assert sorted(p.name for p in resumed.glob("checkpoint-*")) == [f"checkpoint-{5 // every * every}", "checkpoint-6"]
            assert (resumed / "checkpoint-6" / "relora_method.json").is_file()

    assert not (tmp_path / "relora/zero3-planted/exploit_ran").exists()  # refused before DeepSpeed unpickled it

    # ReLoRA's merges happen after the updates its schedule names, which ran at LR 0 (Trainer's records)
    for name in ("one/relora", "relora/zero2", "relora/fsdp2"):
        logs = [r for r in run_record(tmp_path / name)["log_history"] if "loss" in r]
        merged_after = [r["step"] for before, r in zip([{"merges": 0}] + logs, logs) if r["merges"] > before["merges"]]
        assert merged_after == [4], name
        assert [r["learning_rate"] for r in logs if r["step"] in merged_after] == [0.0], name

    # bf16 (DeepSpeed's bf16 parameters, fp32 masters) lands within a fifth of how far fp32 training moved
    fp32, bf16 = exported(tmp_path / "one/relora/merged"), exported(tmp_path / "relora/zero2-bf16/merged")
    assert distance(fp32, bf16) < 0.2 * distance(fp32, initial_model(tmp_path / "one/relora/merged"))


def initial_model(merged: Path) -> dict:
    """The plain model every run starts from (the example seeds with --seed 0 and builds the config it exported)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(merged))
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture
def trainer_arguments(tmp_path):
    """TrainingArguments of a 1-process CPU run (no launcher, no process group): what the refusals are checked on.
    What they leave process-wide (accelerate's state, environment variables) is undone afterwards."""
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    environment = dict(os.environ)

    def make(**overrides):
        return TrainingArguments(**{"output_dir": str(tmp_path), "max_steps": 6, "use_cpu": True, "report_to": "none",
                                    **overrides})
    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.parametrize("overrides, settings, expected", [
    ({"optim": "galore_adamw_layerwise"}, {}, "optim=galore_adamw_layerwise would replace the method's optimizer"),
    ({"optim": "adafactor"}, {}, "optim=adafactor would replace"),
    ({"lr_scheduler_type": "cosine"}, {}, "lr_scheduler_type=cosine: the method's own schedule drives the LR"),
    ({"max_steps": -1}, {}, "set TrainingArguments(max_steps=N)"),
    ({}, {"merge_evry": 3}, "method_settings merge_evry unknown to --method relora"),
    ({}, {"warm_start_steps": 2}, "rebuilds the model mid-run"),
    ({}, {"merge_every": 2, "restart_warmup_steps": 5}, "merge_every (2 updates) must be >="),
])
def test_trainer_options_that_would_change_the_method_are_refused_in_one_line(trainer_arguments, overrides, settings,
                                                                                expected):
    from relora_dist.integrations.transformers import MethodTrainer
    from relora_dist.models import llama_config

    with pytest.raises(ValueError) as refusal:
        MethodTrainer(model=llama_config("debug", vocab_size=64), args=trainer_arguments(**overrides), method="relora",
                      method_settings=settings)
    assert expected in str(refusal.value) and "\n" not in str(refusal.value)


def test_an_architecture_method_needs_its_config_and_optimizers_are_the_methods(trainer_arguments):
    from relora_dist.integrations.transformers import MethodTrainer
    from relora_dist.models import build_model, llama_config

    args = trainer_arguments()
    for method in ("cola", "control"):  # another architecture; another size
        with pytest.raises(ValueError, match=f"--method {method} trains a model of its own"):
            MethodTrainer(model=build_model(llama_config("debug", vocab_size=64)), args=args, method=method)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="MethodTrainer builds the method's optimizer and schedule: pass no optimizers="):
        MethodTrainer(model=llama_config("debug", vocab_size=64), args=args, method="relora", optimizers=(optimizer, None))
