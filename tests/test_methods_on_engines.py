"""The rule everything rests on: the engine never changes the result. Every registered method, with its defaults, on
every engine, 2 gloo ranks against the single-process run with the same flags (same global batches): losses and the
merged export to 1e-5 after 6 updates.

The model is one no other test uses, chosen so that engines split matrices unevenly: hidden 36, ffn 91 (FSDP2's row
shards uneven; ZeRO-1/2/3's partition boundaries inside rows), one key/value head (k and v 18 x 36: std GaLore projects
them from the left too, as down_proj), 3 layers. Every method's event period is shortened so that its events happen
within the run (a ReLoRA merge, GaLore refreshes, SwitchLoRA switches, SST's resamples and a re-SVD); the rest is
each method's default. Adam eps 1e-3 and few updates keep the reduction order's rounding from being amplified into the
check. A method that cannot be exact on an engine must refuse it before any work, in one line (the pre-flight checks
relora-train runs on every rank first); it is then not run. Two launches in all (tests/dist/method_runs.py): the references on one process, every
2-rank run in one."""

import json

import pytest

from conftest import (ENGINE_FLAGS, SMALL, exported, launch_runs, max_relative_difference, read_metrics, registered_methods,
                      run_case)

pytestmark = pytest.mark.dist

UPDATES = 6
MODEL = {"hidden_size": 36, "intermediate_size": 91, "num_hidden_layers": 3, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# What makes each family's events fall inside 6 updates; a flag a method does not read leaves it alone
EVENTS = ["--warm-start-steps", "2", "--merge-every", "2", "--restart-warmup-steps", "1", "--galore-update-gap", "3",
          "--switchlora-interval", "2", "--switchlora-freeze-steps", "1", "--sst-iteration-steps", "2",
          "--sst-round-iterations", "2", "--sst-restart-warmup", "1"]


def refusal(args: list) -> str | None:
    """The one-line error relora-train's pre-flight checks give a 2-rank run of `args`, or None if they accept it."""
    from relora_dist.train.arguments import parse_run_config
    from relora_dist.train.preflight import preflight

    try:
        preflight(parse_run_config([str(a) for a in args])[0], world_size=2)
    except ValueError as error:
        return str(error)
    return None


def test_every_method_equals_its_single_process_run_on_every_engine(tmp_path):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(MODEL))
    common = SMALL + EVENTS + ["--steps", UPDATES, "--model-config", model, "--seed", "5"]
    methods = registered_methods()
    refused = {(method, engine): refusal(common + ["--method", method, *flags])
               for method in methods for engine, flags in ENGINE_FLAGS.items()}
    for (method, engine), message in refused.items():
        assert message is None or "\n" not in message.strip(), (method, engine, message)
    launch_runs([run_case(f"{method}-reference", tmp_path, "--method", method, "--micro-batch-size", "4")
                 for method in methods], common, nproc=1, tmp_path=tmp_path)
    launch_runs([run_case(f"{method}-{engine}", tmp_path, "--method", method, *flags)
                 for method in methods for engine, flags in ENGINE_FLAGS.items() if refused[method, engine] is None],
                common, nproc=2, tmp_path=tmp_path)
    failures = []
    for method in methods:
        reference = tmp_path / f"{method}-reference"
        losses = [m["loss"] for m in read_metrics(reference)]
        assert len(losses) == UPDATES, method
        weights = exported(reference / "hf")
        for engine in (engine for engine in ENGINE_FLAGS if refused[method, engine] is None):
            run = tmp_path / f"{method}-{engine}"
            if [m["loss"] for m in read_metrics(run)] != pytest.approx(losses, rel=1e-5):
                failures.append(f"{method} on {engine}: losses differ")
            difference = max_relative_difference(weights, exported(run / "hf"))
            if difference >= 1e-5:
                failures.append(f"{method} on {engine}: merged weights differ by {difference:.1e}")
    assert not failures, "\n".join(failures)
