"""End-to-end runs of relora-train: every method learns, resume is exact (I6), the merged export loads in HF."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import relora_dist as rd
from relora_dist.cli.train import export_main, train_main
from relora_dist.models import count_parameters, llama_config, relora_trainable_parameters
from conftest import SMALL, launch_runs, load_run, run_case, run_cli

pytestmark = pytest.mark.dist


METHODS = ["full", "relora", "lora", "lora_ws", "control"]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """One run of every method, all in one launch (tests/dist/method_runs.py)."""
    tmp_path = tmp_path_factory.mktemp("methods")
    common = SMALL + ["--steps", "24", "--warm-start-steps", "8", "--merge-every", "8", "--restart-warmup-steps", "2",
                      "--eval-every", "4", "--lora-dropout", "0.1"]
    launch_runs([run_case(method, tmp_path, "--method", method, export=False) for method in METHODS], common, nproc=1,
                tmp_path=tmp_path)
    return tmp_path


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_falling_validation_loss(method_runs, method):
    summary, metrics, state = load_run(method_runs / method)
    evals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert summary["method"] == method and summary["steps"] == 24 and len(metrics) == 24
    assert summary["val_loss"] < evals[0] < math.log(1024) + 0.5
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in metrics)
    has_lora = any(".lora_A" in k for k in state)
    assert has_lora == (method in ("relora", "lora", "lora_ws"))
    if method == "relora":
        assert summary["merges"] == 1 and summary["resets"] == 1
        assert summary["trainable_parameters"] < summary["model_parameters"]
    if method == "control":  # a full-rank model sized to what ReLoRA trains on the debug model
        debug = llama_config("debug", vocab_size=1024)
        target = relora_trainable_parameters(debug, rank=4)
        assert summary["model_parameters"] < count_parameters(debug)
        assert abs(summary["model_parameters"] - target) < 0.02 * target


@pytest.mark.parametrize("stop_after, mask", [(3, "aten"), (9, "bits16")], ids=["at-phase-switch", "mid-cycle-bits16"])
def test_resume_equals_uninterrupted_run(tmp_path, stop_after, mask):
    """I6 with dropout on: model, optimizer, controller, RNG and data position all restored (either dropout mask)."""
    args = SMALL + ["--method", "relora", "--steps", "14", "--warm-start-steps", "3", "--merge-every", "4",
                    "--restart-warmup-steps", "1", "--lora-dropout", "0.1", "--lora-dropout-mask", mask]
    run_cli(args + ["--out", tmp_path / "full"])
    # warm start ends after update 3; merges after updates 8 and 12
    first = run_cli(args + ["--out", tmp_path / "split", "--stop-after", str(stop_after)])
    assert "continue with --resume" in first.stderr + first.stdout
    part_summary, part_metrics, _ = load_run(tmp_path / "split")
    assert part_summary["finished"] is False and part_summary["steps"] == stop_after
    run_cli(args + ["--out", tmp_path / "split", "--resume"])
    full_summary, full_metrics, full_state = load_run(tmp_path / "full")
    split_summary, split_metrics, split_state = load_run(tmp_path / "split")
    assert split_summary["merges"] == full_summary["merges"] == 2
    assert [m["loss"] for m in split_metrics] == [m["loss"] for m in full_metrics]
    assert [m["lr"] for m in split_metrics] == [m["lr"] for m in full_metrics]
    for key in full_state:
        assert torch.equal(full_state[key], split_state[key]), key


def test_merged_export_loads_in_plain_hf_with_equal_logits(tmp_path):
    out = tmp_path / "run"
    run_cli(SMALL + ["--method", "relora", "--steps", "10", "--warm-start-steps", "3", "--merge-every", "4",
                     "--restart-warmup-steps", "1", "--out", out, "--export-merged", tmp_path / "merged"])
    _, _, state = load_run(out)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in state.items())  # an unmerged cycle exists

    # The trained (wrapped) model, rebuilt from the checkpoint.
    checkpoint = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    config = LlamaConfig(**json.loads((checkpoint / "model_config.json").read_text()))
    wrapped = LlamaForCausalLM(config)
    rd.wrap(wrapped, rd.ReLoRAConfig(rank=4, alpha=8, merge_every=4, restart_warmup_steps=1))
    wrapped.load_state_dict(state)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    x = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    wrapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, wrapped(x).logits, rtol=1e-4, atol=1e-4)
        # Without merging, plain HF silently drops the last cycle: logits differ.
        dropped = LlamaForCausalLM(config)
        dropped.load_state_dict({k: v for k, v in state.items() if "lora" not in k})
        assert (dropped(x).logits - wrapped(x).logits).abs().max() > 1e-3

    # relora-export on the checkpoint gives the same merged weights and a loadable tokenizer.
    assert export_main([str(checkpoint), str(tmp_path / "exported")]) == 0
    again = load_file(tmp_path / "exported" / "model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.decode(tokenizer("def merge(a, b):")["input_ids"]) == "def merge(a, b):"


@pytest.mark.parametrize("keep", [False, True])
def test_warm_start_switch_optimizer_policy(tmp_path, keep):
    """Default: a fresh optimizer after the warm start (reference); --keep-states-at-switch carries
    the Adam states of embeddings/head/norms over (their step counts keep running)."""
    run_cli(SMALL + ["--method", "relora", "--steps", "10", "--warm-start-steps", "3", "--merge-every", "4",
                     "--restart-warmup-steps", "1", "--out", tmp_path, "--stop-after", "5",
                     "--keep-states-at-switch", str(keep).lower()])
    checkpoint = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    full_rank, lora = optimizer["param_groups"]
    steps = {int(optimizer["state"][i]["step"]) for i in full_rank["params"]}
    assert steps == ({5} if keep else {2})
    assert {int(optimizer["state"][i]["step"]) for i in lora["params"]} == {2}


@pytest.mark.parametrize("scope", ["all", "factors"])
def test_lora_lr_scope_sets_each_param_groups_rate(tmp_path, scope):
    """The paper's recipe (all) runs every group at --lora-lr once low-rank; factors only A and B, the embeddings,
    head and norms keep --lr on the same restarts. Read back from the optimizer the engine stepped."""
    run_cli(SMALL + ["--method", "relora", "--steps", "10", "--warm-start-steps", "3", "--merge-every", "4",
                     "--restart-warmup-steps", "1", "--lora-lr", "0.006", "--lora-lr-scope", scope, "--out", tmp_path,
                     "--stop-after", "6"])
    checkpoint = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    full_rank, lora = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert lora["lr"] == last["lr"] > 0  # the logged headline rate is the factors' one
    assert full_rank["lr"] == pytest.approx(lora["lr"] * (1.0 if scope == "all" else 0.5), rel=1e-12)


def test_local_datasets_hf_tokenizer_and_model_config_json(tmp_path, shared_cache, log_to_this_tests_stderr):
    """--dataset jsonl/parquet, --tokenizer an HF tokenizer directory, --model-config an HF config JSON (relora-train's
    entry point in this process: one rank, nothing launched)."""
    import datasets

    from relora_dist.data import embedded_corpus_documents

    docs = embedded_corpus_documents(shared_cache / "corpus")[:120]  # where the runs' trainer keeps it
    datasets.Dataset.from_dict({"body": docs}).to_json(tmp_path / "corpus.jsonl")
    first = SMALL + ["--method", "full", "--steps", "4", "--out", tmp_path / "a", "--dataset", tmp_path / "corpus.jsonl",
                     "--text-field", "body", "--vocab-size", "512"]
    assert train(first) == 0
    summary, _, _ = load_run(tmp_path / "a")
    assert summary["dataset"].startswith("local json dataset")
    checkpoint = tmp_path / "a" / "checkpoints" / "step_0000004"

    datasets.Dataset.from_dict({"text": docs}).to_parquet(tmp_path / "corpus.parquet")
    model_config = json.loads((checkpoint / "model_config.json").read_text())
    model_config["num_hidden_layers"] = 1
    (tmp_path / "one_layer.json").write_text(json.dumps(model_config))
    second = SMALL + ["--method", "relora", "--steps", "7", "--warm-start-steps", "2", "--merge-every", "2",
                      "--restart-warmup-steps", "1", "--out", tmp_path / "b", "--dataset", tmp_path / "corpus.parquet",
                      "--tokenizer", checkpoint / "tokenizer", "--model-config", tmp_path / "one_layer.json"]
    assert train(second) == 0
    summary, _, state = load_run(tmp_path / "b")
    assert summary["dataset"].startswith("local parquet dataset") and summary["merges"] == 2
    assert not any(k.startswith("model.layers.1.") for k in state)
    assert state["model.embed_tokens.weight"].shape[0] == 512


def test_run_directory_is_never_mixed(tmp_path, capsys, log_to_this_tests_stderr):
    """A fresh run refuses an OUT holding another run unless --overwrite; resuming from an older
    checkpoint drops the metrics logged after it, so every update is recorded exactly once (in this process)."""
    args = SMALL + ["--method", "relora", "--steps", "10", "--warm-start-steps", "3", "--merge-every", "4",
                    "--restart-warmup-steps", "1", "--out", tmp_path, "--save-every", "4"]
    assert train(args + ["--stop-after", "6"]) == 0
    capsys.readouterr()
    assert train(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err.strip().splitlines()[-1]
    assert train(args + ["--resume", tmp_path / "checkpoints" / "step_0000004"]) == 0  # as if killed after update 6
    _, metrics, _ = load_run(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert train(args + ["--overwrite", "true", "--stop-after", "2"]) == 0
    _, metrics, _ = load_run(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]


def train(args) -> int:
    return train_main([str(a) for a in args])
