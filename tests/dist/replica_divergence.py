"""torchrun --nproc_per_node 2: perturb one tensor on rank 1 and check that replica_mismatches names it."""

import torch
import torch.distributed as dist

from relora_dist.distributed import close_distributed
from relora_dist.train.consistency import replica_mismatches

dist.init_process_group("gloo")
same = torch.arange(10, dtype=torch.float32)
diverged = torch.ones(3, 4)
if dist.get_rank() == 1:
    diverged[2, 3] = torch.nextafter(diverged[2, 3], torch.tensor(2.0))  # one ulp
found = replica_mismatches([("same", same), ("diverged", diverged)], torch.device("cpu"))
if dist.get_rank() == 0:
    print(f"detected: {found}")
close_distributed()
