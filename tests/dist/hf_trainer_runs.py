"""Several examples/hf_trainer.py runs in one launch (a launch costs ~10 s): each case is the common flags plus its
own, run by the example's `main` one after the other in this process group, on the engine its flags name (Trainer's
accelerator is reset between cases, as a new process would start).

    torchrun --nproc_per_node 2 tests/dist/hf_trainer_runs.py CASES.json

CASES.json: {"common": [flags...], "cases": [{"name": ..., "args": [flags...], ...}, ...]}, a case optionally with
- `resume_from`: DIR: before the case, rank 0 copies DIR's checkpoints but the last into the case's --out, so the case
  resumes (its args say --resume) from the one before;
- `plant`: FILE (with `resume_from`): that file of the copy replaced by a pickle that would run `touch
  OUT/exploit_ran` when unpickled;
- `refused`: TEXT: the case must end in a refusal (ValueError, or argparse's exit 2) whose message holds TEXT, or
  with `exit_code` 0, in argparse's exit 0 (--help) with TEXT in its output;
- `cpu_fsdp2`: false: MethodTrainer without accelerate's CPU device gate lifted;
- `relora_train`: true: the args are relora-train's, run by its own Trainer (a 1-process reference).
Prints `RUN OK <name> <seconds>s` after each case (for a refusal, after the refusal was seen).
"""

import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_trainer  # noqa: E402


def reset_trainer_state() -> None:
    """What one Trainer run leaves process-wide: accelerate's singleton state (the process group stays), the
    DeepSpeed config transformers keeps, and the launcher-style variables TrainingArguments set."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    for name in [n for n in os.environ if n.startswith(("ACCELERATE_USE_", "FSDP_", "ACCELERATE_MIXED_PRECISION"))]:
        del os.environ[name]


def copy_all_but_last_checkpoint(source: Path, target: Path) -> None:
    checkpoints = sorted(source.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    target.mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoints[:-1]:
        shutil.copytree(checkpoint, target / checkpoint.name)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _WithoutCpuGate(hf_trainer.MethodTrainer):
    def __init__(self, *args, cpu_fsdp2=False, **kwargs):
        super().__init__(*args, cpu_fsdp2=False, **kwargs)


def run_case(case: dict, args: list[str]) -> None:
    if case.get("relora_train"):
        from relora_dist.train.arguments import parse_run_config
        from relora_dist.train.trainer import Trainer

        Trainer(parse_run_config(args)[0]).train()
        return
    trainer_class = hf_trainer.MethodTrainer
    if case.get("cpu_fsdp2") is False:
        hf_trainer.MethodTrainer = _WithoutCpuGate
    output = io.StringIO()
    try:
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
            hf_trainer.main(args)
    except (ValueError, SystemExit) as error:
        message = f"{error} {output.getvalue()}"
        if "refused" not in case or case["refused"] not in message or getattr(error, "code", 2) != case.get("exit_code", 2):
            raise AssertionError(f"case {case['name']}: {message}") from error
        return
    finally:
        hf_trainer.MethodTrainer = trainer_class
        sys.stderr.write(output.getvalue())
    if "refused" in case:
        raise AssertionError(f"case {case['name']} ran; expected a refusal naming {case['refused']!r}")


def main(path: str) -> int:
    spec = json.loads(open(path).read())
    rank = int(os.environ.get("RANK", "0"))
    for case in spec["cases"]:
        started = time.perf_counter()
        args = [str(a) for a in spec["common"] + case["args"]]
        out = Path(args[args.index("--out") + 1])
        if case.get("resume_from") and rank == 0:
            copy_all_but_last_checkpoint(Path(case["resume_from"]), out)
            if case.get("plant"):
                torch.save(_Exploit(out / "exploit_ran"), out / case["plant"])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        run_case(case, args)
        reset_trainer_state()
        if rank == 0:
            print(f"RUN OK {case['name']} {time.perf_counter() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[-1]))
