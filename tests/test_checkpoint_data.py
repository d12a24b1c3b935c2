"""A checkpoint is data (#33): a pickle that would run code, planted in a real checkpoint in place of one of its files,
is refused by `--resume` and by relora-export in one line naming the file, and never runs. Planted where each engine
unpickles: a single process's RNG, method state and model files (torch.load); DeepSpeed ZeRO-2's model and optimizer
files (read by DeepSpeed itself with weights_only=False: the engine's load_checkpoint, zero_to_fp32, the universal
conversion); FSDP2's DCP `.metadata` (plain pickle.load in DCP) and a non-tensor item of a `.distcp` file (DCP's
torch.load with weights_only=False). One training run per engine; every case plants into its own copy."""

import dataclasses
import io
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ENGINE_FLAGS, SMALL, launch_runs, run_case, run_cli
from relora_dist.cli.train import export_main, train_main

RUN = SMALL + ["--method", "full", "--steps", "2"]
RESUME = SMALL + ["--method", "full", "--steps", "3"]  # one update past the checkpoint: a real resume


class Exploit:
    """Unpickled, it runs `touch MARKER` (pickled as a reference to os.system, so any process can load it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def refusal(prog: str, file) -> str:
    return f"{prog}: error: checkpoint file {file} is not plain data (it names posix.system): refusing to unpickle it"


def error_lines(prog: str, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]


def planted_copy(checkpoint: Path, tmp_path: Path, relative: str) -> tuple[Path, Path, Path]:
    """A copy of `checkpoint` whose file `relative` is the exploit; returns (copy, that file, the exploit's marker)."""
    copy = tmp_path / "planted" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "exploit_ran"
    file = copy / relative
    assert file.is_file() or relative == "method_state.pt", f"{relative} is not in the checkpoint"  # (planted anew: read when present)
    torch.save(Exploit(marker), file)
    return copy, file, marker


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def export_refused_or_clean(copy: Path, file: Path, marker: Path, tmp_path: Path, capsys, *, reads_it: bool) -> None:
    """relora-export refuses the copy in one line naming `file` when it reads that file, else exports it; the
    exploit never runs."""
    code = export_main([str(copy), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    if reads_it:
        assert code == 2 and error_lines("relora-export", err) == [refusal("relora-export", file)], err[-3000:]
        assert "Traceback" not in err and not (tmp_path / "hf").exists()
    else:
        assert code == 0, err[-3000:]
    assert not marker.exists(), "the planted pickle ran"


pytestmark = pytest.mark.usefixtures("log_to_this_tests_stderr")


# -- one process ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_checkpoint(tmp_path_factory, shared_cache) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert train_main(RUN + ["--out", str(out)]) == 0
    return latest(out)


@pytest.mark.parametrize("relative, export_reads_it", [("rng_rank0.pt", False), ("method_state.pt", False),
                                                       ("model.pt", True)])
def test_a_single_process_checkpoint_refuses_a_planted_pickle(single_checkpoint, tmp_path, capsys, relative, export_reads_it):
    """The RNG state (read after the engine's load), the method state (read before the engine is built) and the
    model (also what relora-export reads): each is loaded with weights_only=True."""
    copy, file, marker = planted_copy(single_checkpoint, tmp_path, relative)
    code = train_main(RESUME + ["--out", str(tmp_path / "resumed"), "--resume", str(copy)])
    err = capsys.readouterr().err
    assert code == 2 and error_lines("relora-train", err) == [refusal("relora-train", file)], err[-3000:]
    assert "Traceback" not in err and not marker.exists()
    export_refused_or_clean(copy, file, marker, tmp_path, capsys, reads_it=export_reads_it)


# -- DeepSpeed ZeRO-2 and FSDP2, 2 ranks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_checkpoints(tmp_path_factory, shared_cache) -> dict[str, Path]:
    """A 2-rank ZeRO-2 and a 2-rank FSDP2 checkpoint, trained in one launch."""
    tmp = tmp_path_factory.mktemp("engines")
    launch_runs([run_case(name, tmp, *ENGINE_FLAGS[name], export=False) for name in ("zero2", "fsdp2")], RUN, nproc=2,
                tmp_path=tmp)
    return {name: latest(tmp / name) for name in ("zero2", "fsdp2")}


def resume_refused(engine: str, copy: Path, file, marker: Path, tmp_path: Path, *, nproc: int) -> None:
    """relora-train --resume of the planted copy stops every rank with the one line (rank 0's) and no traceback."""
    result = run_cli(RESUME + ENGINE_FLAGS[engine] + ["--out", tmp_path / "resumed", "--resume", copy], nproc=nproc,
                     launcher="deepspeed" if engine.startswith("zero") else "torchrun", check=False, timeout=180)
    assert result.returncode != 0
    assert error_lines("relora-train", result.stderr) == [refusal("relora-train", file)], result.stderr[-3000:]
    assert "]: Traceback" not in result.stderr and not marker.exists()


@pytest.mark.dist
@pytest.mark.parametrize("relative, nproc", [("engine/mp_rank_00_model_states.pt", 2),
                                             ("engine/zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)],
                         ids=["model-file-2-ranks", "rank-1-optimizer-file-1-rank"])
def test_a_deepspeed_checkpoint_refuses_a_planted_pickle_before_deepspeed_reads_it(engine_checkpoints, tmp_path, capsys,
                                                                                  relative, nproc):
    """DeepSpeed reads its files with weights_only=False: every file of the checkpoint is read as data first, on every
    rank (rank 0 refuses rank 1's file too, so no rank waits for a peer), also before the universal conversion a
    resume on another number of ranks runs, and before relora-export's zero_to_fp32."""
    copy, file, marker = planted_copy(engine_checkpoints["zero2"], tmp_path, relative)
    resume_refused("zero2", copy, file, marker, tmp_path, nproc=nproc)
    assert not (copy / "universal").exists()
    export_refused_or_clean(copy, file, marker, tmp_path, capsys, reads_it=True)


def plant_in_distcp(dcp: Path, marker: Path) -> tuple[Path, str]:
    """The first non-tensor item of the DCP checkpoint replaced by the exploit, appended to its .distcp file (the
    metadata, this test's own, now points there). Returns (that file, the item)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = pickle.loads((dcp / ".metadata").read_bytes())
    fqn = next(fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata))
    where = metadata.storage_data[MetadataIndex(fqn)]
    file, blob = dcp / where.relative_path, io.BytesIO()
    torch.save(Exploit(marker), blob)
    offset = file.stat().st_size
    with open(file, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[MetadataIndex(fqn)] = dataclasses.replace(where, offset=offset, length=len(blob.getvalue()))
    (dcp / ".metadata").write_bytes(pickle.dumps(metadata))
    return file, fqn


@pytest.mark.dist
@pytest.mark.parametrize("part, nproc", [("metadata", 2), ("item", 1)], ids=["metadata-2-ranks", "distcp-item-1-rank"])
def test_an_fsdp2_checkpoint_refuses_a_planted_pickle_before_dcp_reads_it(engine_checkpoints, tmp_path, capsys, part, nproc):
    """DCP reads `.metadata` with pickle.load and non-tensor items (the optimizer's hyperparameters) with torch.load
    weights_only=False: both are read as data first (DCP's own classes allowed in the metadata)."""
    checkpoint = engine_checkpoints["fsdp2"]
    copy = tmp_path / "planted" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "exploit_ran"
    if part == "metadata":  # DCP's metadata is a plain pickle, not a torch.save file
        file = copy / "dcp" / ".metadata"
        file.write_bytes(pickle.dumps(Exploit(marker)))
    else:
        data, fqn = plant_in_distcp(copy / "dcp", marker)
        file = f"{data} ({fqn})"
    resume_refused("fsdp2", copy, file, marker, tmp_path, nproc=nproc)
    export_refused_or_clean(copy, file, marker, tmp_path, capsys, reads_it=True)
