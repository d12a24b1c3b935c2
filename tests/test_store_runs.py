"""Training from token stores in real processes: a mixture of two stores on 2 DDP ranks (DataLoader worker on) equals
the 1-process run, resumes on 1 rank mid-epoch, and a two-node launch (two torchrun agents, c10d rendezvous on
localhost, one rank each) equals it too. The shares of the mixture are logged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relora_dist.data import SequenceSampler, TokenStore, embedded_corpus_documents, prepare_store, parse_mixture
from conftest import (RELORA_RUN, SMALL, TRAIN, exported, free_port, launch_env, max_relative_difference, read_metrics,
                      run_cli)

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores with one tokenizer: the embedded corpus's first 250 documents, and 120 others."""
    root = tmp_path_factory.mktemp("stores")
    docs = embedded_corpus_documents()
    for name, part in (("a", docs[:250]), ("b", docs[250:370])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    a = prepare_store([str(root / "a.jsonl")], root / "store_a", vocab_size=1024, progress=False)
    b = prepare_store([str(root / "b.jsonl")], root / "store_b", tokenizer=str(a / "tokenizer"), progress=False)
    return a, b


@pytest.fixture(scope="module")
def mixture_args(stores):
    a, b = stores
    return SMALL + RELORA_RUN + ["--dataset", f"{a}=0.7,{b}=0.3", "--eval-every", "4"]


@pytest.fixture(scope="module")
def reference(mixture_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("store_reference")
    run_cli(mixture_args + ["--out", out, "--micro-batch-size", "4", "--export-merged", out / "hf"])
    return out


def assert_same_run(metrics: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    for a, b in zip(metrics, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert (a.get("val_loss") is None) == (b.get("val_loss") is None)
        if a.get("val_loss") is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_mixture_logs_each_stores_share(reference, stores, mixture_args):
    a, b = stores
    metrics = read_metrics(reference)
    seq_len = int(SMALL[SMALL.index("--seq-len") + 1])
    sizes = [len(TokenStore(s).train.sequences(seq_len)) for s in stores]
    sampler = SequenceSampler(sizes, 8, seed=0, weights=[c.weight for c in parse_mixture(f"{a}=0.7,{b}=0.3")])
    for m in metrics:
        shares = sampler.shares(m["step"] - 1)
        assert m["data_share/store_a"] == shares[0] / 8 and m["data_share/store_b"] == shares[1] / 8
    assert sum(m["data_share/store_a"] for m in metrics) / len(metrics) == pytest.approx(0.7, abs=0.02)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["dataset"].startswith("mixture of store_a (0.7: ") and "store_b (0.3: " in summary["dataset"]


def test_two_ranks_with_a_loader_worker_equal_one_and_resume_on_one_rank(reference, mixture_args, tmp_path):
    """2 DDP ranks (batches read and prefetched by a DataLoader worker) for 6 updates, then a resume on 1 rank at
    update 6 (mid-epoch of both stores) to the end: the same losses and merged model as the 1-process run."""
    out = tmp_path / "run"
    run_cli(mixture_args + ["--out", out, "--loader-workers", "1", "--stop-after", "6"], nproc=2)
    assert_same_run(read_metrics(out), read_metrics(reference)[:6])
    run_cli(mixture_args + ["--out", out, "--resume", "--export-merged", out / "hf"])
    assert_same_run(read_metrics(out), read_metrics(reference))
    assert max_relative_difference(exported(reference / "hf"), exported(out / "hf")) < 1e-5


def test_two_nodes_read_one_store(reference, mixture_args, tmp_path):
    """Two torchrun agents (--nnodes 2, node ranks 0 and 1, c10d rendezvous on localhost), one rank each, read the
    same stores: the run equals the 1-process run."""
    out, port = tmp_path / "run", free_port()
    args = [str(a) for a in mixture_args + ["--out", out, "--export-merged", out / "hf"]]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two_nodes",
         "--rdzv-conf", f"is_host={int(node == 0)}", TRAIN, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env()) for node in (0, 1)]
    results = [agent.communicate(timeout=300) for agent in agents]
    for agent, (stdout, stderr) in zip(agents, results):
        assert agent.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_same_run(read_metrics(out), read_metrics(reference))
    assert max_relative_difference(exported(reference / "hf"), exported(out / "hf")) < 1e-5
