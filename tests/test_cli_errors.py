"""Bad input ends in one line on stderr and exit 2, never a traceback."""

import re

import pytest

from relora_dist.cli import export_main, train_main
from conftest import SMALL, run_cli

BASE = SMALL + ["--steps", "6", "--warm-start-steps", "2", "--merge-every", "2", "--restart-warmup-steps", "1"]

CASES = [
    (["--model", "llama_13b"], "unknown model preset 'llama_13b'"),
    (["--method", "qlora"], "unknown method 'qlora'"),
    (["--rank", "0"], "rank must be > 0"),
    (["--rank", "64"], r"rank 64 is invalid .* it must be in \[1, 32\]"),
    (["--prune-ratio", "1.0"], r"prune ratio must be in \[0, 1\)"),
    (["--prune-ratio", "-0.5"], r"prune ratio must be in \[0, 1\)"),
    (["--merge-every", "2", "--restart-warmup-steps", "5"], "merge_every .* must be >= the restart warm-up"),
    (["--target-modules", "attention.wq"], "match no nn.Linear"),
    (["--dataset", "/nonexistent/corpus.txt"], "dataset path not found: /nonexistent/corpus.txt"),
    (["--seq-len", "4096"], "seq_len 4096 exceeds the model's max positions 1024"),
    (["--global-batch-size", "100000", "--micro-batch-size", "1"], "too few tokens for one global batch"),
    (["--resume"], "no checkpoint found"),
    (["--global-batch-size", "8", "--micro-batch-size", "3"], "not divisible by micro batch size 3"),
    (["--dtype", "fp8"], "dtype must be one of fp32, bf16"),
    (["--warm-start-steps", "6"], "warm start .* must end before the run"),
    (["--backend", "horovod"], "unknown backend 'horovod'"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--model-config", "/nonexistent.json"], "model config not found"),
    (["--steps", "0"], "steps must be > 0"),
    (["--lr", "-1"], "learning rates must be > 0"),
    (["--backend", "fsdp2", "--keep-states-at-switch", "true"], "not supported with --backend fsdp2"),
    (["--backend", "fairscale", "--keep-states-at-switch", "true"], "not supported with --backend fairscale"),
    (["--fsdp-reshard-after-forward", "false"], "applies to --backend fsdp2 only"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    assert train_main(BASE + ["--out", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relora-train: error: "), err
    assert re.search(message, err[0]), err[0]


def test_unknown_flag_and_bad_type_exit_2_in_one_line(capsys):
    for argv in (["--no-such-flag"], ["--steps", "ten"]):
        with pytest.raises(SystemExit) as exit_info:
            train_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err


def test_yaml_with_unknown_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stpes: 10\n")
    assert train_main(["--config", str(config)]) == 2
    assert "unknown key(s) in config section 'train': stpes" in capsys.readouterr().err


def test_export_of_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("{not json")
    assert export_main([str(bad), str(tmp_path / "out")]) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_real_process_prints_no_traceback(tmp_path):
    result = run_cli(BASE + ["--out", tmp_path, "--rank", "0"], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "relora-train: error: relora rank must be > 0, got 0 (--rank)"


def test_resume_from_a_mismatching_checkpoint(tmp_path, capsys):
    args = BASE + ["--out", str(tmp_path), "--method", "full"]
    assert train_main(args) == 0
    capsys.readouterr()
    assert train_main(args[:] + ["--resume", "--method", "relora"]) == 2
    assert "was written with method 'full', this run uses 'relora'" in capsys.readouterr().err
    assert train_main(args + ["--resume", "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run" in err[0], err
