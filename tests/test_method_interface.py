"""The method interface: a new method is one folder (tests/plugins/frozen_embeddings/: registered by a plug-in
launcher, tests/dist/train_with_plugin.py, or dropped into relora_dist/methods/ with nothing else changed) that trains
on 2 gloo ranks under DDP and FSDP2 exactly like a single process, with its state checkpointed; the registry drives
--method; method state is weights_only- and DCP-loadable."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RELORA_RUN, SMALL, assert_run_equals_reference, exported, load_run, read_metrics, run_cli
from relora_dist.methods import Method, method_class, method_names, register_method
from relora_dist.models import build_model, llama_config
from relora_dist.train.arguments import parse_run_config
from test_layering import violations

PLUGIN = REPO / "tests" / "dist" / "train_with_plugin.py"
PLUGIN_FAMILY = REPO / "tests" / "plugins" / "frozen_embeddings"
FROZEN = RELORA_RUN[:1] + ["relora_frozen_embeddings"] + RELORA_RUN[2:]
BUILT_IN = ("full", "control", "lora", "lora_ws", "relora")


def test_built_in_methods_come_from_the_registry():
    assert method_names()[: len(BUILT_IN)] == BUILT_IN
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_class("nope")
    for name in method_names():
        assert issubclass(method_class(name), Method) and method_class(name).name == name


def test_loop_and_engines_never_name_a_method():
    """The loop calls the method; engines see the access layer only."""
    loop = (REPO / "relora_dist" / "train" / "trainer.py").read_text()
    for name in BUILT_IN:
        assert f'"{name}"' not in loop, name
    for path in (REPO / "relora_dist" / "backends").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("..methods", "..merge", "..prune", "..layer", "relora_layers", "lora_A", "lora_B"):
            assert forbidden not in text, (path.name, forbidden)
    for path in (REPO / "relora_dist" / "methods").rglob("*.py"):
        assert "..backends" not in path.read_text(), path.name


def test_a_registered_method_gets_its_flag_and_config_section():
    @register_method
    class Probe(Method):
        name = "probe_method"

    try:
        cfg, _ = parse_run_config(["--method", "probe_method", "--steps", "4"])
        assert cfg.train.method == "probe_method"
    finally:
        from relora_dist.methods import base

        base._REGISTRY.pop("probe_method")


@pytest.mark.dist
def test_a_new_method_is_one_folder_under_methods(tmp_path):
    """The test-only family copied into a copy of relora_dist/methods/ registers itself: --method lists it, its
    --dry-run plans a run, and the layer rules hold for it (it reaches ReLoRA through the family's public names)."""
    shutil.copytree(REPO / "relora_dist", tmp_path / "relora_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PLUGIN_FAMILY, tmp_path / "relora_dist" / "methods" / PLUGIN_FAMILY.name)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    # one process: the registry lists it, then relora-train's --dry-run plans a run of it
    script = ("import sys; from relora_dist.methods import method_names; print(method_names());"
              " from relora_dist.cli.train import train_main; sys.exit(train_main())")
    planned = subprocess.run([sys.executable, "-c", script, *map(str, SMALL + FROZEN), "--dry-run", "--out", str(tmp_path / "run")],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    listed = planned.stdout.splitlines()[0] if planned.stdout else ""
    assert "relora_frozen_embeddings" in listed, planned.stderr[-2000:]
    assert planned.returncode == 0 and "relora_frozen_embeddings" in "\n".join(planned.stdout.splitlines()[1:]) + planned.stderr, \
        planned.stderr[-2000:]
    for folder in ("docs", "benchmarks", "kernels"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    assert violations(tmp_path, tmp_path / "docs" / "ARCHITECTURE.md") == []


@pytest.mark.dist
def test_a_new_method_is_one_folder_and_trains_exactly_on_ddp_and_fsdp2(tmp_path):
    """The test-only method, 1 process vs 2 ranks under DDP and FSDP2: same losses, merges at updates 7 and 10 at
    LR 0, the same merged model with the embeddings exactly as initialised; a run resumed mid-cycle restores the
    method's own state (its per-update log fields match the uninterrupted run)."""
    reference = tmp_path / "one"
    run_cli(SMALL + FROZEN + ["--out", reference, "--micro-batch-size", "4", "--export-merged", reference / "hf"],
            script=PLUGIN)
    for backend in ("ddp", "fsdp2"):
        out = tmp_path / backend
        run_cli(SMALL + FROZEN + ["--backend", backend, "--out", out, "--export-merged", out / "hf"], nproc=2,
                script=PLUGIN)
        assert_run_equals_reference(out, reference, backend)
        assert read_metrics(out)[-1]["events_applied"] == 4  # two merges, two resets

    config = json.loads(next((reference / "checkpoints").glob("step_*/model_config.json")).read_text())
    torch.manual_seed(0)  # relora-train's default --seed: the initial model every rank builds
    initial = build_model(llama_config("debug", vocab_size=config["vocab_size"]))
    merged = exported(reference / "hf")
    assert torch.equal(merged["model.embed_tokens.weight"], initial.model.embed_tokens.weight.detach())
    assert not torch.equal(merged["lm_head.weight"], initial.lm_head.weight.detach())  # the rest trains
    assert load_run(reference)[0]["trainable_parameters"] == load_run(tmp_path / "ddp")[0]["trainable_parameters"]
    method_state = torch.load(next((reference / "checkpoints").glob("step_*/method_state.pt")), weights_only=True)
    assert method_state["event_steps"].tolist() == [1, 1, 2, 2] and method_state["version"] == 1

    split = tmp_path / "split"
    run_cli(SMALL + FROZEN + ["--out", split, "--micro-batch-size", "4", "--stop-after", "8"], script=PLUGIN)
    run_cli(SMALL + FROZEN + ["--out", split, "--micro-batch-size", "4", "--resume"], script=PLUGIN)
    assert [m["events_applied"] for m in read_metrics(split)] == [m["events_applied"] for m in read_metrics(reference)]
    assert [m["loss"] for m in read_metrics(split)] == [m["loss"] for m in read_metrics(reference)]


def test_method_state_loads_with_weights_only_and_through_dcp(tmp_path):
    """What a method's state_dict may hold (tensors and primitives) survives torch.save/weights_only and DCP."""
    sys.path.insert(0, str(PLUGIN_FAMILY.parent))
    try:
        import frozen_embeddings  # noqa: F401  (registers the test-only method)
    finally:
        sys.path.pop(0)
    try:
        _method_state_round_trips(tmp_path)
    finally:  # the registry is process-wide: later tests (the fingerprint tool's) list the built-in methods only
        from relora_dist.methods import base

        base._REGISTRY.pop("relora_frozen_embeddings", None)
        for name in [m for m in sys.modules if m == "frozen_embeddings" or m.startswith("frozen_embeddings.")]:
            sys.modules.pop(name)


def _method_state_round_trips(tmp_path):
    import torch.distributed.checkpoint as dcp

    cfg, _ = parse_run_config(SMALL + FROZEN)
    method = method_class("relora_frozen_embeddings")(cfg)
    method.event_steps = torch.tensor([1, 1, 2])
    state = method.state_dict()
    torch.save(state, tmp_path / "state.pt")
    assert torch.equal(torch.load(tmp_path / "state.pt", weights_only=True)["event_steps"], state["event_steps"])
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    loaded = {"event_steps": torch.zeros(3, dtype=torch.int64), "version": 0}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(loaded["event_steps"], state["event_steps"]) and loaded["version"] == 1
    for name in BUILT_IN:  # the built-in methods keep no state beyond the model and optimizer
        assert method_class(name)(parse_run_config(SMALL + ["--method", name, "--steps", "12", "--warm-start-steps", "3"])[0]).state_dict() == {}


@pytest.mark.parametrize("method", ["full", "relora", "galore"])
def test_non_projection_lr_scale_moves_only_the_parameters_outside_the_projections(method):
    """--non-projection-lr-scale 4: the embeddings, head and norms take 4x their group's rate, every parameter inside
    an attention or MLP projection keeps it; at 1 the method's groups are untouched (same objects, no lr_scale)."""
    from relora_dist.backends.base import set_group_lrs
    from relora_dist.train.build import build_method_model, run_model_config, scale_non_projection_lr
    from relora_dist.train.config import standalone_method

    owner = standalone_method(method, rank=4)
    model = build_method_model(owner, run_model_config(owner, "debug", vocab_size=64, max_positions=64),
                               owner.phases()[-1][0])
    groups = owner.param_groups(model)
    assert scale_non_projection_lr(groups, model, 1.0) is groups
    scaled = scale_non_projection_lr(groups, model, 4.0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(id(p) for g in scaled for p in g["params"]) == sorted(id(p) for g in groups for p in g["params"])
    set_group_lrs(scaled, {g["name"]: 0.01 for g in groups})
    rates = {names[id(p)]: g["lr"] for g in scaled for p in g["params"]}
    assert rates["model.embed_tokens.weight"] == rates["lm_head.weight"] == rates["model.norm.weight"] == 0.04
    inside = [name for name in rates if "_proj." in name]
    assert inside and all(rates[name] == 0.01 for name in inside)
    assert all(rates[name] == 0.04 for name in rates if "_proj." not in name)
