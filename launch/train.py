"""Entry point for launchers: torchrun --nproc_per_node N launch/train.py ... (same flags as relora-train)."""

import sys

from relora_dist.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
