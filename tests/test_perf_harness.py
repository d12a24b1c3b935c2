"""relora-bench and relora-memprof on 2 real gloo ranks: the counted gradient traffic and the memory census equal
the exact accounting, and the slow-link emulation really holds the all-reduce back. Numbers, not "it ran"."""

import json
import subprocess
import sys

import pytest

from relora_dist.methods import method_class
from relora_dist.models import llama_config
from relora_dist.perf import FULL_RANK, ModelCounts

from conftest import launch_env, registered_methods

SHAPE = ["--preset", "tiny", "--vocab-size", "1000", "--seq-len", "32", "--rank", "8", "--micro-batch-size", "2",
         "--accumulation-steps", "3", "--warmup-updates", "1", "--updates", "2"]
COUNTS = ModelCounts.from_config(llama_config("tiny", vocab_size=1000, max_positions=32), rank=8, seq_len=32,
                                 traits=FULL_RANK)  # a plain LLaMA: the layout of full rank and ReLoRA alike


def harness(module: str, args, tmp_path) -> dict:
    out = tmp_path / f"{module}.json"
    cmd = [sys.executable, "-m", f"relora_dist.benchmarks.{module}", "--nproc", "2", *SHAPE, *args, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=launch_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def by_case(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    # every registered method alive at once, their updates alternated
    sync_once = harness("throughput", ["--engines", "ddp,fsdp2", "--methods", "all", "--interleave"], tmp)
    paper_loop = harness("throughput", ["--engines", "ddp", "--allreduce-every-microbatch", "--emulate-busbw", "0,0.02"], tmp)
    return sync_once, paper_loop


@pytest.mark.dist
def test_gradient_bytes_are_counted_exactly(bench):
    """DDP sends 4 B per trainable parameter per all-reduce: once per update with no_sync, after each of the 3
    micro-batches in the paper's loop. FSDP2 reduce-scatters the full gradient once per update (plus padding).
    With --interleave (sync_once) each update counts its own case's collectives only."""
    sync_once, paper_loop = bench
    rows = by_case(sync_once["rows"], "engine", "method")
    loop = by_case(paper_loop["rows"], "method", "emulated_busbw_gbs")
    for method in ("full", "relora"):
        trainable = COUNTS.trainable(method_class(method).cost_traits)
        assert rows["ddp", method]["trainable_parameters"] == trainable
        assert rows["ddp", method]["bytes_per_update"] == 4 * trainable
        assert loop[method, None]["bytes_per_update"] == 3 * 4 * trainable
        reduce_scatter = rows["fsdp2", method]["collectives"]["reduce_scatter_single"]
        assert reduce_scatter["calls"] >= 1 and 4 * trainable <= reduce_scatter["bytes"] <= 1.05 * 4 * trainable
        assert "all_gather_single" in rows["fsdp2", method]["collectives"]  # FSDP2 gathers the sharded params
    # GaLore steps its own optimizer: on FSDP2's row shards, between refreshes, one all-reduce of its own per update:
    # the left-projected matrices' partial products (down_proj, r x 352 fp32 in each of the 2 layers), exactly what
    # the accounting counts; Fira adds one float per projected matrix to it (its limiter's norms, a second call)
    left = 4 * ModelCounts.from_config(llama_config("tiny", vocab_size=1000, max_positions=32), rank=8, seq_len=32,
                                       traits=method_class("galore").cost_traits).n_left_projected
    assert left == 4 * 2 * 8 * 352
    galore = dict(rows["fsdp2", "galore"]["collectives"])
    assert galore.pop("all_reduce") == {"calls": 1, "bytes": left}
    assert galore == rows["fsdp2", "full"]["collectives"]
    assert rows["fsdp2", "fira"]["collectives"]["all_reduce"] == {"calls": 2, "bytes": left + 4 * 7 * 2}  # 7 x 2 layers
    assert {m for _, m in rows} == set(registered_methods())  # --methods all: the registry
    for method in set(registered_methods()) - {"full", "relora"}:  # the others: what they train, once per update
        assert rows["ddp", method]["bytes_per_update"] == 4 * rows["ddp", method]["trainable_parameters"] > 0


def test_a_method_is_measured_only_on_the_engines_it_supports(monkeypatch):
    from relora_dist.benchmarks.common import cases
    from relora_dist.methods import Method, base

    class FsdpOnly(Method):
        name, engines = "fsdp_only", ("fsdp2",)

    monkeypatch.setitem(base._REGISTRY, "fsdp_only", FsdpOnly)
    kept, skipped = cases(["full", "fsdp_only"], ["ddp", "zero2", "fsdp2"])
    assert kept == [("ddp", "full"), ("zero2", "full"), ("fsdp2", "full"), ("fsdp2", "fsdp_only")]
    assert skipped == ["fsdp_only on ddp: not supported (the method runs on fsdp2)",
                       "fsdp_only on zero2: not supported (the method runs on fsdp2)"]
    FsdpOnly.engines = ("deepspeed",)  # zeroN engines are DeepSpeed
    assert ("zero2", "fsdp_only") in cases(["fsdp_only"], ["zero2"])[0]


@pytest.mark.dist
def test_throughput_fields_are_consistent(bench):
    sync_once, _ = bench
    for row in sync_once["rows"]:
        assert row["global_batch_size"] == 2 * 2 * 3 and row["world_size"] == 2 and row["interleaved"]
        assert row["examples_per_s"] == pytest.approx(12 / row["update_s"])
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["examples_per_s"] * 32 / 2)
        assert 0 < row["mfu"] and 0 < row["hfu"]
        assert row["hfu"] / row["mfu"] == pytest.approx(row["executed_flops_per_token"] / row["model_flops_per_token"])
        assert row["exposed_comm_s"] is not None and row["exposed_comm_s"] >= 0
        assert (row["merge_reset_s"] > 0) == (row["method"] in ("relora", "switchlora", "sst"))  # their periodic events
    assert {s["engine"] for s in sync_once["speedups"]} == {"ddp", "fsdp2"}


@pytest.mark.dist
def test_slow_link_emulation_holds_the_allreduce_back(bench):
    """At 0.02 GB/s every micro-batch's all-reduce must take at least 2(n-1)/n x bytes / busbw."""
    _, paper_loop = bench
    loop = by_case(paper_loop["rows"], "method", "emulated_busbw_gbs")
    for method in ("full", "relora"):
        slow = loop[method, 0.02]
        floor = slow["bytes_per_update"] / 0.02e9  # 2(n-1)/n = 1 at n = 2
        assert slow["backward_s"] >= floor
        assert slow["exposed_comm_s"] >= 0.5 * floor  # most of it cannot hide behind a tiny backward


@pytest.mark.dist
def test_memory_census_matches_the_accounting(tmp_path):
    """DDP holds everything whole: parameters and gradients exactly as counted, Adam states plus AdamW's per-parameter
    step scalars. FSDP2 holds half of the parameters, gradients and states (up to row padding), GaLore's moments
    exactly as counted."""
    result = harness("memory", ["--engines", "ddp,fsdp2", "--methods", "full,relora,galore,switchlora,sst",
                                "--gpu-memory-gb", "1"], tmp_path)
    rows = by_case(result["rows"], "engine", "method")
    # SwitchLoRA: its candidate pools held as parameters, a step counter per factor element in the optimizer
    assert rows["ddp", "switchlora"]["expected_parameters"] > rows["ddp", "relora"]["expected_parameters"]
    for engine in ("ddp", "fsdp2"):  # GaLore's projectors: whole on every rank of both engines, exactly as counted
        galore = rows[engine, "galore"]
        assert galore["census_projectors"] == galore["expected_projectors"] > 0
        # the moments: row shards of the right-projected matrices, down_proj's r x n whole on every rank; step scalars
        assert galore["expected_optimizer"] <= galore["census_optimizer"] <= galore["expected_optimizer"] + 4 * 100
    for method in ("full", "relora", "switchlora", "sst"):  # SST: U, V, sigma and the active copies held
        ddp, fsdp2 = rows["ddp", method], rows["fsdp2", method]
        for key in ("parameters", "gradients"):
            assert ddp[f"census_{key}"] == ddp[f"expected_{key}"]
            assert fsdp2[f"expected_{key}"] <= fsdp2[f"census_{key}"] <= 1.02 * fsdp2[f"expected_{key}"]
        assert 0 <= ddp["census_optimizer"] - ddp["expected_optimizer"] <= 4 * 100  # AdamW's 4-byte step per param
        assert ddp["activation_bytes_per_token"] > 0 and ddp["peak_sampled"] > ddp["static_census"]
        assert ddp["largest_micro_batch"] == 0  # 1 GB minus the 1 GiB context the model reserves: nothing fits
    assert rows["ddp", "relora"]["activation_bytes_per_token"] > rows["ddp", "full"]["activation_bytes_per_token"]


@pytest.mark.dist
def test_memory_census_counts_deepspeeds_exact_copies(tmp_path):
    """DeepSpeed bf16 keeps SwitchLoRA's W and pools (SST's U and V) in fp32 copies beside its bf16 parameters, whole on
    every rank at ZeRO-2: the census finds exactly the bytes the accounting predicts, and nothing for ReLoRA (which declares none)."""
    result = harness("memory", ["--engines", "zero2", "--methods", "relora,switchlora,sst", "--dtype", "bf16",
                                "--gpu-memory-gb", "1"], tmp_path)
    rows = by_case(result["rows"], "engine", "method")
    switchlora, relora, sst = rows["zero2", "switchlora"], rows["zero2", "relora"], rows["zero2", "sst"]
    assert sst["census_exact_copies"] == sst["expected_exact_copies"] > 0  # U and V
    assert sst["census_parameters"] == sst["expected_parameters"]
    assert switchlora["census_exact_copies"] == switchlora["expected_exact_copies"] > 0
    assert relora["census_exact_copies"] == relora["expected_exact_copies"] == 0
    assert switchlora["census_parameters"] == switchlora["expected_parameters"]  # bf16 W, pools and factors
