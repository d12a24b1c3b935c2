"""benchmarks/quality.py end to end on the smoke preset: every requested row trains on the same token budget, the
results and plots are written, and the update spectra have the ranks the methods imply (LoRA + WS: r; ReLoRA:
r per merged cycle; full rank: full). Perplexities are reported, never asserted."""

import json
import subprocess
import sys

from conftest import REPO, launch_env


def test_quality_pipeline_and_update_ranks(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--preset", "smoke", "--rows", "full,lora_ws,relora,R+O", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "quality.json").read_text())
    assert set(data["best"]) == {"full", "lora_ws", "relora", "R+O"}
    runs = {r["row"]: r for r in data["runs"]}
    assert all(not r["diverged"] and r["curve"][-1][0] == 24 * 8 * 32 for r in runs.values())  # same token budget
    assert {c["paper"] for c in data["orderings"]} >= {"relora < lora_ws", "R+O diverges"}
    # debug model: hidden 32, rank 4; 24 updates, warm start 6, merges at 12 and 18, the last cycle unmerged.
    ranks = {k: v["numerical_rank"] for k, v in data["spectrum"].items()}
    assert ranks == {"full": 32, "lora_ws": 4, "relora": 12}
    for name in ("quality.md", "val_loss.png", "spectrum.png"):
        assert (out / name).stat().st_size > 0
    assert "| relora | relora |" in (out / "quality.md").read_text()


def test_every_row_is_a_valid_relora_train_command(tmp_path):
    """Each row's arguments parse and configure what the row names (a switch spelled as its field name, not its
    flag, once made a row fail only when the benchmark ran)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    from relora_dist.train.arguments import parse_run_config

    for name, (method, overrides) in quality.ROWS.items():
        config, _ = parse_run_config(quality.run_arguments(name, 1e-3, quality.PRESETS["cpu"], tmp_path))
        assert config.train.method == method, name
        for switch, value in overrides.items():
            assert getattr(config.relora, switch) == value, (name, switch)
