"""Bad input ends in one line on stderr and exit 2, never a traceback: every row of the table in
docs/FAULT_TOLERANCE.md, run from the table itself."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from relora_dist.cli.train import export_main, train_main
from relora_dist.cli.data import main as data_main
from conftest import REPO, SMALL, run_cli

BASE = SMALL + ["--steps", "6", "--warm-start-steps", "2", "--merge-every", "2", "--restart-warmup-steps", "1"]
DOC = REPO / "docs" / "FAULT_TOLERANCE.md"


def table_rows() -> list[tuple[str, str, str]]:
    """(bad input, command, expected fragments) of every numbered row of the doc's bad-input table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((cells[1], cells[2].strip("`"), cells[3].strip("`")))
    return rows


ROWS = table_rows()


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr(monkeypatch):
    """Stream handlers (train_main's basicConfig, the `datasets` library's own) bind to the stderr of the test
    that created them; later tests need their own."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stderr)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, shared_cache) -> dict[str, Path]:
    """The files the table's {names} stand for."""
    root = tmp_path_factory.mktemp("bad_input")
    texts = {
        "bad_yaml": ("bad.yaml", "train: [unclosed\n"), "list_yaml": ("list.yaml", "- a\n- b\n"),
        "typo_yaml": ("typo.yaml", "train:\n  stpes: 10\n"), "bad_json": ("bad.json", "{not json"),
        "ds_optimizer": ("ds_optimizer.json", json.dumps({"optimizer": {"type": "Adam"}})),
        "ds_stage4": ("ds_stage4.json", json.dumps({"zero_optimization": {"stage": 4}})), "empty_txt": ("empty.txt", ""),
        "csv_file": ("data.csv", "a,b\n1,2\n"), "jsonl_no_text": ("no_text.jsonl", '{"body": "a"}\n{"body": "b"}\n'),
        "bad_jsonl": ("bad.jsonl", '{"text": "ok"}\n{broken\n'), "one_doc": ("one.txt", "one paragraph only\n"),
        "a_file": ("a_file", "x"),
    }
    files = {}
    for name, (filename, text) in texts.items():
        files[name] = root / filename
        files[name].write_text(text)
    files["empty_dir"] = root / "empty_dir"
    files["empty_dir"].mkdir()
    files["a_dir"] = root / "export_out"
    files["finished_run"] = root / "finished"
    files.update(bad_stores(root, shared_cache))
    assert train_main(BASE + ["--method", "full", "--out", str(files["finished_run"])]) == 0
    checkpoints = files["finished_run"] / "checkpoints"
    files["checkpoint"] = checkpoints / (checkpoints / "latest").read_text().strip()
    for name, spoil in (("half_written", lambda d: (d / "trainer_state.json").unlink()),
                        ("corrupt_state", lambda d: (d / "trainer_state.json").write_text("{not json")),
                        ("truncated_model", lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:5000]))):
        files[name] = root / name
        shutil.copytree(files["checkpoint"], files[name])
        spoil(files[name])
    return files


def bad_stores(root: Path, cache: Path) -> dict[str, Path]:
    """Token stores for the table: good ones (two sharing a tokenizer, one with another) and spoiled copies."""
    from relora_dist.data import embedded_corpus_documents, prepare_store

    docs = embedded_corpus_documents(cache / "corpus")  # where the runs' trainer keeps it
    files = {"docs_jsonl": root / "docs.jsonl", "full_dir": root / "full_dir"}
    files["docs_jsonl"].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[60:120]))
    files["full_dir"].mkdir()
    (files["full_dir"] / "notes.txt").write_text("mine")
    files["store"] = prepare_store([str(files["docs_jsonl"])], root / "store", vocab_size=1024, progress=False, num_proc=1)
    files["store_b"] = prepare_store([str(root / "b.jsonl")], root / "store_b", tokenizer=str(files["store"] / "tokenizer"),
                                     progress=False, num_proc=1)
    files["store_other"] = prepare_store([str(root / "b.jsonl")], root / "store_other", vocab_size=512, progress=False,
                                         num_proc=1)
    files["other_tokenizer"] = files["store_other"] / "tokenizer"
    shard = Path("train") / "tokens-000000.bin"
    for name, spoil in (("store_v99", lambda d: (d / "manifest.json").write_text(
                            json.dumps(json.loads((d / "manifest.json").read_text()) | {"version": 99}))),
                        ("store_truncated", lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:-2])),
                        ("store_corrupt", lambda d: (d / shard).write_bytes(bytes([(d / shard).read_bytes()[0] ^ 1]) +
                                                                            (d / shard).read_bytes()[1:]))):
        files[name] = root / name
        shutil.copytree(files["store"], files[name])
        spoil(files[name])
    return files


def test_the_table_has_at_least_30_rows():
    assert len(ROWS) >= 30 and len({command for _, command, _ in ROWS}) == len(ROWS)


@pytest.mark.parametrize("what, command, expected", ROWS, ids=[f"{i}-{row[0][:40]}" for i, row in enumerate(ROWS, 1)])
def test_bad_input_is_one_line(tmp_path, capsys, bad_files, what, command, expected):
    prog, *args = [arg.format(**bad_files) for arg in shlex.split(command)]
    try:
        if prog == "relora-train":
            code = train_main(BASE + ([] if "--out" in args else ["--out", str(tmp_path / "run")]) + args)
        elif prog == "relora-data":
            code = data_main(args)
        else:
            code = export_main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    # (progress bars of `datasets` may come first; the error is one line, the last)
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (what, code, err[-2000:])
    assert "Traceback" not in err, (what, err[-2000:])
    pattern = ".*".join(re.escape(fragment.strip()) for fragment in expected.split("…"))
    assert re.search(pattern, errors[0]), (what, errors[0])


@pytest.mark.dist
def test_real_process_prints_no_traceback(tmp_path):
    result = run_cli(BASE + ["--out", tmp_path, "--rank", "0"], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "relora-train: error: relora rank must be > 0, got 0 (--rank)"


@pytest.mark.dist
def test_every_rank_of_a_distributed_run_stops_on_bad_input(tmp_path):
    """A bad dataset found by rank 0 while it builds the data: rank 1 must not wait forever in a collective."""
    result = run_cli(BASE + ["--out", tmp_path, "--dataset", tmp_path / "missing.txt"], nproc=2, check=False, timeout=120)
    assert result.returncode != 0
    assert "relora-train: error: dataset path not found" in result.stderr
    assert "]: Traceback" not in result.stderr


# Rows that need the data, the tokenizer or the run directory: only a real run can see them.
NEEDS_RUN_STATE = ("--dataset", "--tokenizer", "--vocab-size 100", "--global-batch-size 100000", "--out", "--resume")
DRY_ROWS = [row for row in ROWS if row[1].startswith("relora-train ") and not any(k in row[1] for k in NEEDS_RUN_STATE)]


def test_dry_run_covers_most_rows():
    assert len(DRY_ROWS) >= 30


@pytest.mark.parametrize("what, command, expected", DRY_ROWS, ids=[row[0][:40] for row in DRY_ROWS])
def test_dry_run_rejects_what_the_run_rejects(tmp_path, capsys, bad_files, what, command, expected):
    """--dry-run builds no data and starts no engine, yet refuses the same bad input with the same line."""
    _, *args = [arg.format(**bad_files) for arg in shlex.split(command)]
    try:
        code = train_main(BASE + ["--out", str(tmp_path / "run"), "--dry-run"] + args)
    except SystemExit as e:  # argparse
        code = e.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relora-train: error: ")]
    pattern = ".*".join(re.escape(fragment.strip()) for fragment in expected.split("…"))
    assert code == 2 and len(errors) == 1 and re.search(pattern, errors[0]), (what, code, errors)
    assert not (tmp_path / "run").exists()  # nothing written


def test_dry_run_accepts_a_good_config_and_says_what_it_checked(capsys):
    assert train_main(BASE + ["--dry-run", "--backend", "fsdp2"]) == 0
    out = capsys.readouterr().out
    assert "# ok: method relora, backend fsdp2, 1 rank(s), 4 micro-batch(es) per rank per update" in out
    assert "fsdp2:\n  reshard_after_forward: true" in out
