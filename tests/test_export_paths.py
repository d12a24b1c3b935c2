"""relora-export takes a checkpoint as the README names it: the step directory, the `latest` pointer file, the
checkpoints folder or the run directory (the last three: its latest checkpoint); anything else is one line, exit 2."""


import pytest
from safetensors.torch import load_file

from relora_dist.cli.train import export_main, train_main
from relora_dist.export import merged_weights
from conftest import SMALL


pytestmark = pytest.mark.usefixtures("log_to_this_tests_stderr")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("export_paths") / "run"
    assert train_main(SMALL + ["--steps", "6", "--warm-start-steps", "2", "--merge-every", "2", "--restart-warmup-steps", "1",
                               "--method", "full", "--out", str(out)]) == 0
    return out


def _weights(directory):
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    return {f.name: load_file(f) for f in files}


def test_every_way_of_naming_the_checkpoint_exports_the_same_model(run_dir, tmp_path, capsys):
    checkpoints = run_dir / "checkpoints"
    step_dir = checkpoints / (checkpoints / "latest").read_text().strip()
    given = {"step_dir": step_dir, "latest": checkpoints / "latest", "checkpoints": checkpoints, "run": run_dir}
    exported = {}
    for name, path in given.items():
        assert export_main([str(path), str(tmp_path / name)]) == 0, (name, capsys.readouterr().err[-2000:])
        exported[name] = _weights(tmp_path / name)
    reference = exported["step_dir"]
    for name, weights in exported.items():
        assert weights.keys() == reference.keys(), name
        for file, tensors in weights.items():
            assert tensors.keys() == reference[file].keys(), (name, file)
            assert all(tensors[k].equal(reference[file][k]) for k in tensors), (name, file)
    # relora-spectrum's reader (merged_weights) resolves the same way.
    by_step, by_run = merged_weights(step_dir), merged_weights(run_dir)
    assert by_step.keys() == by_run.keys() and all(by_step[k].equal(by_run[k]) for k in by_step)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("relora-export: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err[-2000:]
    return errors[0]


def test_missing_path_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoints" / "latest"
    assert export_main([str(missing), str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) == f"relora-export: error: checkpoint not found: {missing}"
    assert not (tmp_path / "out").exists()


def test_folder_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "something").mkdir()
    assert export_main([str(tmp_path / "something"), str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) == (f"relora-export: error: {tmp_path / 'something'} is neither a checkpoint,"
                                       " a run directory nor a checkpoints folder")


def test_run_without_a_committed_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step_0000002.tmp").mkdir(parents=True)  # killed mid-write
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) == (f"relora-export: error: {tmp_path / 'run'}: no complete checkpoint found in"
                                       f" {tmp_path / 'run' / 'checkpoints'}")
