"""python launch/export.py CHECKPOINT OUT_DIR: merged HF model from a relora-train checkpoint."""

import sys

from relora_dist.cli.train import export_main

if __name__ == "__main__":
    sys.exit(export_main())
