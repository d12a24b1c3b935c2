"""DeepSpeed ZeRO 0/1/2/3: real engines on 2 gloo ranks, launched with the `deepspeed` launcher, against a
single-process torch reference on the same global batches."""

import json
import shutil
import subprocess

import pytest

from conftest import (REPO, RELORA_RUN as RELORA, SMALL, assert_run_equals_reference, deepspeed_command, exported, killed_run, launch_env,
                      launch_runs, max_relative_difference, read_metrics, run_case, run_cli)
from relora_dist.backends.deepspeed.engine_config import engine_config
from relora_dist.cli.train import export_main, train_main

CONFIGS = REPO / "launch" / "configs"
# z{stage}-{dtype}-{prune}[-flags]: see tests/dist/deepspeed_checks.py. Grouped per launch (a start costs ~10 s).
CASE_GROUPS = {
    "stages-0-1": ["z0-fp32-magnitude", "z0-fp32-random", "z0-bf16-magnitude", "z1-fp32-magnitude", "z1-fp32-random",
                   "z1-bf16-magnitude", "z1-bf16-magnitude-bf16opt"],
    "stage-2": ["z2-fp32-magnitude", "z2-fp32-random", "z2-bf16-magnitude", "z2-fp32-magnitude-rr", "z2-bf16-random-rr",
                "z2-fp32-magnitude-offload"],
    "stage-3": ["z3-fp32-magnitude", "z3-fp32-random", "z3-bf16-magnitude", "z3-fp32-magnitude-persist0",
                "z3-bf16-magnitude-persist0", "z3-fp32-random-persist0", "z3-fp32-magnitude-offload",
                "z3-bf16-random-persist0-gathered"],
}


@pytest.mark.dist
@pytest.mark.parametrize("group", list(CASE_GROUPS))
def test_resets_inside_real_engines_are_exact_and_move_no_W(group):
    """Per case and restart: the exact expectation from the gathered pre-reset state (bf16 too), no W-sized
    transfer, identical replicas, and fp32 parameters/states equal to the torch reference (~1e-6)."""
    cases = CASE_GROUPS[group]
    cmd = deepspeed_command(REPO / "tests" / "dist" / "deepspeed_checks.py") + ["--cases", ",".join(cases)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env())
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-4000:])
    for case in cases:
        assert f"CASE OK {case} " in out.stdout, out.stdout[-3000:]
    exact = [line for line in out.stdout.splitlines() if line.startswith("CASE OK") and "-rr" not in line]
    assert all("exact_restarts=3" in line for line in exact)


@pytest.mark.dist
def test_non_finite_loss_on_one_rank_skips_the_update_everywhere():
    """stage 0 (our guard around the bare optimizer), ZeRO-1/2/3 and bf16 (DeepSpeed's own overflow check)."""
    out = subprocess.run(deepspeed_command(REPO / "tests" / "dist" / "deepspeed_nan_skip.py"), capture_output=True,
                         text=True, timeout=300, env=launch_env())
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-4000:])
    assert out.stdout.count("SKIP OK") == 6, out.stdout[-2000:]


@pytest.mark.dist
def test_the_deepspeed_bugs_we_work_around_are_real_on_these_shapes():
    """The reset checks above only prove the workarounds if DeepSpeed's own API fails on the same shapes:
    ZeRO-3 safe_set_full_fp32_param with numel % world != 0, and _hp_mapping under round_robin_gradients
    (our storage-offset fragments, packed-masters path included, read the true values there)."""
    out = subprocess.run(deepspeed_command(REPO / "tests" / "dist" / "deepspeed_bugs.py"), capture_output=True,
                         text=True, timeout=300, env=launch_env())
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-4000:])
    assert "OURS OK" in out.stdout, out.stdout[-2000:]
    for bug in ("BUG1", "BUG2"):
        assert f"{bug} PRESENT" in out.stdout, f"DeepSpeed fixed {bug}: its workaround and this canary may go"


LAUNCHED = {"zero3": ["--deepspeed", CONFIGS / "zero3.json", "--shared-lora-input", "true"],
            "zero2": ["--deepspeed", CONFIGS / "zero2.json"]}


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory):
    """Per config: a whole run, a run killed at a random update and resumed, and the checkpoint the kill left resumed on
    one rank for one update, then on two to the end. Both configs' runs share each launch but the kills."""
    root = tmp_path_factory.mktemp("launched")
    common = SMALL + RELORA

    def cases(name: str, *args, export=True) -> list[dict]:
        return [run_case(f"{config}/{name}", root, *flags, *args, export=export) for config, flags in LAUNCHED.items()]

    launch_runs(cases("whole"), common, nproc=2, tmp_path=root, launcher="deepspeed")
    faults, resumed_at = {}, {}
    for config, flags in LAUNCHED.items():
        faults[config] = killed_run(common + flags, root / config / "split", launcher="deepspeed")
        split = root / config / "split" / "checkpoints"
        shutil.copytree(split / (split / "latest").read_text().strip(), root / config / "left")
        resumed_at[config] = json.loads((root / config / "left" / "trainer_state.json").read_text())["controller"]["step"]
    launch_runs(cases("split", "--resume"), common, nproc=2, tmp_path=root, launcher="deepspeed")
    # 2 -> 1 rank for one update, then 1 -> 2 ranks to the end: both through universal checkpoints
    launch_runs([run_case(f"{config}/hop", root, *flags, "--resume", root / config / "left", "--stop-after",
                          resumed_at[config] + 1, export=False) for config, flags in LAUNCHED.items()],
                common, nproc=1, tmp_path=root, launcher="deepspeed")
    launch_runs(cases("hop", "--resume"), common, nproc=2, tmp_path=root, launcher="deepspeed")
    return root, faults, resumed_at


@pytest.mark.dist
@pytest.mark.parametrize("config", list(LAUNCHED))
def test_deepspeed_launcher_run_equals_single_process_and_resumes_mid_cycle(launched_runs, reference_run, config):
    """relora-train under `deepspeed`: warm start, 2 merges/resets, merged export (consolidated from ZeRO-3
    shards on rank 0) equal to the single-process run; merges at LR 0 (I5); a run stopped mid-cycle and
    resumed from DeepSpeed's own checkpoint after one rank was SIGKILLed at a random update equals the
    uninterrupted one (I6); the checkpoint the kill left, resumed on one rank for one update and then on two
    again (DeepSpeed universal checkpoints + our frozen W), ends at the reference model too. ZeRO-3 runs with q/k/v
    and gate/up sharing one LoRA down-projection: a module reads its siblings' A (external parameters) through inputs
    DeepSpeed hands each module as a fresh alias."""
    root, faults, resumed_ats = launched_runs
    tmp_path, fault, resumed_at = root / config, faults[config], resumed_ats[config]
    assert_run_equals_reference(tmp_path / "whole", reference_run, "deepspeed")
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    # I6: same losses and the same final model, from engine.load_checkpoint + the controller state
    assert [m["loss"] for m in split] == [m["loss"] for m in whole], fault
    assert max_relative_difference(exported(tmp_path / "whole" / "hf"), exported(tmp_path / "split" / "hf")) == 0.0, fault
    # other world sizes: the losses after the resume and the final model as the single-process reference
    reference_losses = [m["loss"] for m in read_metrics(reference_run)][resumed_at:]
    assert [m["loss"] for m in read_metrics(tmp_path / "hop")] == pytest.approx(reference_losses, rel=1e-5), fault
    assert max_relative_difference(exported(reference_run / "hf"), exported(tmp_path / "hop" / "hf")) < 1e-5, fault
    assert (tmp_path / "left" / "universal").is_dir() and not (tmp_path / "left" / "universal.tmp").exists()
    assert json.loads((tmp_path / "hop" / "summary.json").read_text())["world_size"] == 2
    # relora-export, one process, from DeepSpeed's sharded checkpoint (zero_to_fp32): the same merged model
    latest = (tmp_path / "whole" / "checkpoints" / "latest").read_text().strip()
    assert export_main([str(tmp_path / "whole" / "checkpoints" / latest), str(tmp_path / "offline")]) == 0
    assert max_relative_difference(exported(tmp_path / "whole" / "hf"), exported(tmp_path / "offline")) == 0.0


@pytest.mark.dist
def test_bf16_zero3_with_cpu_offload_through_the_cli(tmp_path):
    """bf16 params with fp32 masters and CPU optimizer offload through the full CLI (ZeRO-3, the hardest layout)."""
    run_cli(SMALL + RELORA + ["--deepspeed", CONFIGS / "zero3_offload.json", "--dtype", "bf16", "--out", tmp_path,
                              "--check-replicas", "true"], nproc=2, launcher="deepspeed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["merges"] == 2 and summary["val_loss"] < 7.0


@pytest.mark.parametrize("bad, message", [
    ({"optimizer": {"type": "Adam"}}, "must not set 'optimizer'"),
    ({"fp16": {"enabled": True}}, "must not set 'fp16'"),
    ({"bf16": {"enabled": True}}, "bf16.enabled=True but --dtype is fp32"),
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu=7"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5"),
    ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "NVMe offload"),
])
def test_engine_config_rejects_what_the_run_config_owns(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine_config(bad, dtype="fp32", micro_batch_size=2, accumulation_steps=2, world_size=2, max_norm=1.0)


def test_engine_config_fills_batch_clip_precision_and_boundary():
    config = engine_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto"},
                           dtype="bf16", micro_batch_size=2, accumulation_steps=3, world_size=2, max_norm=0.7)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.7 and config["bf16"]["enabled"] is True
    assert config["managed_gradient_accumulation"] is False and "train_batch_size" not in config


@pytest.mark.parametrize("args, message", [
    (["--backend", "deepspeed"], "needs a DeepSpeed JSON config"),
    (["--deepspeed", "/nonexistent/zero2.json"], "cannot read DeepSpeed config"),
    (["--deepspeed", str(CONFIGS / "zero2.json"), "--keep-states-at-switch", "true"], "not supported with --backend deepspeed"),
])
def test_bad_deepspeed_arguments_give_one_line_errors(tmp_path, capsys, log_to_this_tests_stderr, args, message):
    """Found before any rank starts: relora-train's own entry point, in this process."""
    assert train_main([str(a) for a in SMALL + ["--steps", "2", "--out", tmp_path] + args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-2000:]
