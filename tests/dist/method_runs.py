"""Several relora-train runs in one launch (a launch costs ~10 s; a debug-sized run ~3 s): each case is the common
flags plus its own, trained by the same `Trainer` relora-train uses, one after the other in this process group.

    torchrun --nproc_per_node 2 tests/dist/method_runs.py CASES.json
    deepspeed --num_gpus 2 tests/dist/method_runs.py CASES.json   (the launcher puts --local_rank=N first)

CASES.json: {"common": [flags...], "cases": [{"name": ..., "args": [flags...], "env": {VAR: value}}, ...]}.
A case's `env` (fault injection) is set for that case only; torch.compile's caches are reset between cases, as a new
process would start. Prints `RUN OK <name> <seconds>s` after each case.
"""

import json
import os
import sys
import time

import torch

from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.train.arguments import parse_run_config
from relora_dist.train.trainer import Trainer


def main(path: str) -> int:
    spec = json.loads(open(path).read())
    info = init_distributed()
    for case in spec["cases"]:
        started = time.perf_counter()
        saved = {name: os.environ.get(name) for name in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        try:
            cfg, _ = parse_run_config([str(a) for a in spec["common"] + case["args"]])
            Trainer(cfg).train()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        torch.compiler.reset()
        if info.rank == 0:
            print(f"RUN OK {case['name']} {time.perf_counter() - started:.1f}s", flush=True)
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[-1]))
