"""relora-compare end to end on the smoke preset (every default row on one token budget, the written files, the update
spectra's ranks, the 2-rank bench columns, a chunk reusing finished runs), and its sweep rule. Perplexities are
reported, never asserted."""

import json
import math
import subprocess
import sys

import pytest

from conftest import launch_env
from relora_dist.benchmarks.compare import PRESETS, factors_scoped, rows, run_arguments, sweep_extension
from relora_dist.methods import method_class, method_names


def compare(*args):
    result = subprocess.run([sys.executable, "-m", "relora_dist.benchmarks.compare", *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=launch_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.dist
def test_smoke_comparison_every_row_one_budget_and_chunks_reuse_finished_runs(tmp_path):
    out = tmp_path / "c"
    printed = compare("--smoke", "--out", out)
    assert "estimate:" in printed.split("training")[0] and "10-update probe" in printed  # before any training
    assert not (out / "runs" / "probe").exists()  # the probe's run is removed once timed
    data = json.loads((out / "compare.json").read_text())
    default = [n for n, r in rows().items() if r.default]
    assert set(data["rows"]) == set(default)
    tokens = PRESETS["smoke"].tokens
    assert tokens == 24 * 8 * 32 and all(r["train_tokens"] == tokens for r in data["runs"])  # one budget
    assert sorted(len(r["seeds"]) for r in data["rows"].values()) == [1] * (len(default) - 2) + [2, 2]  # top 2 repeat
    for name, r in data["rows"].items():
        adam_bytes = 8 * r["trainable_parameters"]  # Adam fp32; GaLore-style methods keep projected moments instead
        traits = method_class(r["method"]).cost_traits
        projected = traits.projected_state
        if traits.factor_step_counters:  # plus a step counter per LoRA element (SwitchLoRA's VectorStepAdamW)
            assert adam_bytes < r["optimizer_state_bytes"] < 12 * r["trainable_parameters"], name
        else:
            assert r["trainable_parameters"] > 0 and (r["optimizer_state_bytes"] < adam_bytes if projected
                                                      else r["optimizer_state_bytes"] == adam_bytes), name
        assert r["bytes_per_update_2ranks"] > 0 and r["tokens_per_s_per_rank_2ranks"] > 0, name
        assert r["recipe"] == (rows()[name].lora_lr_scope if factors_scoped(r["method"]) else None)
    # debug model: hidden 32, rank 4; 24 updates, warm start 6, merges at 12 and 18, the last cycle unmerged.
    assert {k: v["numerical_rank"] for k, v in data["spectrum"].items()} == {"full": 32, "lora_ws": 4, "relora": 12}
    assert {c["paper"] for c in data["orderings"]} >= {"relora < lora_ws", "R+O diverges"}
    for name in ("compare.md", "val_loss.png", "lr_sweep.png", "ppl.png", "spectrum.png", "bench.json"):
        assert (out / name).stat().st_size > 0, name
    assert "| relora@factors | factors |" in (out / "compare.md").read_text()

    # A chunk: two rows at another LR; their LR-0.002 runs are reused, not retrained.
    first = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/compare_record.json")}
    compare("--smoke", "--out", out, "--methods", "full,relora", "--lrs", "0.002,0.004", "--seeds", "0", "--bench", "false")
    again = json.loads((out / "compare.json").read_text())
    assert set(again["rows"]) == {"full", "relora"} and again["rows"]["relora"]["lrs"] == [0.002, 0.004]
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    assert len(list(out.glob("runs/*/compare_record.json"))) == len(first) + 2


@pytest.mark.parametrize("tried, wanted", [
    ({1e-3: 3.0, 2e-3: 2.9, 4e-3: 3.1}, []),  # bracketed
    ({1e-3: 3.0, 2e-3: 3.1}, [5e-4]),  # best at the low end
    ({1e-3: 3.2, 2e-3: 3.1}, [4e-3]),  # best at the high end
    ({1e-3: 3.2, 2e-3: 3.1, 4e-3: math.inf}, []),  # a diverged neighbour brackets too
    ({2e-3: 3.1}, [1e-3, 4e-3]),  # one LR: both ways
    ({1e-3: math.inf, 2e-3: math.inf}, [5e-4]),  # all diverged: lower
])
def test_sweep_widens_until_the_best_lr_is_bracketed(tried, wanted):
    assert sweep_extension(tried) == pytest.approx(wanted)


def test_every_registered_method_has_rows_and_every_row_is_a_valid_relora_train_command(tmp_path):
    """A new method gets its row (and its @factors row when it is low rank) by being registered; each row's arguments
    parse and configure what the row names (a switch spelled as its field name, not its flag, once made a row fail
    only when the benchmark ran)."""
    from relora_dist.train.arguments import parse_run_config

    every = rows()
    assert set(method_names()) <= set(every)
    assert {n for n in every if n.endswith("@factors")} == {f"{m}@factors" for m in method_names()
                                                           if method_class(m).cost_traits.adapters
                                                           and method_class(m).config_section == "relora"}
    for name, row in every.items():
        config, _ = parse_run_config(run_arguments(name, 1e-3, 1, PRESETS["cpu"], tmp_path))
        assert config.train.method == row.method and config.train.seed == 1, name
        assert config.optim.lora_lr_scope == row.lora_lr_scope and config.optim.lora_lr == 2e-3, name
        assert config.data.dataset == "builtin:stdlib-source" and config.data.vocab_size == 2048
        for switch, value in row.relora.items():
            assert getattr(config.relora, switch) == value, (name, switch)
        assert config.optim.non_projection_lr_scale == row.non_projection_lr_scale, name
    assert every["full@np4"].default and every["full@np4"].non_projection_lr_scale == 4.0


def test_any_row_takes_a_non_projection_rate_multiple(tmp_path):
    """<row>@np<k>: the row with --non-projection-lr-scale k (the freedom full@np4 gets, for every row); a malformed
    multiple is an unknown row."""
    from relora_dist.benchmarks.compare import parse, row
    from relora_dist.train.arguments import parse_run_config

    config, _ = parse_run_config(run_arguments("galore@np0.5", 1e-3, 0, PRESETS["cpu"], tmp_path))
    assert config.train.method == "galore" and config.optim.non_projection_lr_scale == 0.5
    assert row("relora@factors@np2").lora_lr_scope == "factors" and not row("full@np2").default
    for bad in ("galore@np0", "galore@npx", "nothing@np2"):
        with pytest.raises(SystemExit):
            parse(["--methods", bad])
