"""relora-train with the test-only method family `tests/plugins/frozen_embeddings/` registered (a plug-in: nothing
in the loop, the engines or the schedule names it).

    torchrun --nproc_per_node 2 tests/dist/train_with_plugin.py --method relora_frozen_embeddings ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

import frozen_embeddings  # noqa: E402,F401  (registers relora_frozen_embeddings)
from relora_dist.cli.train import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
