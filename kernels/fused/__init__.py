"""Fused Triton kernels for ReLoRALinear, importable as `relora_dist.kernels` (setup.py maps this folder there).

Set TRITON_INTERPRET=1 before triton is imported to run them on a CPU (how the tests check them).
"""

import os

# Explicit FMA contraction (triton 3.9 warns that its default changes in 3.10): numerics must not drift.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from .fused_linear import dropout_keep_mask, fused_relora_linear  # noqa: E402

__all__ = ["fused_relora_linear", "dropout_keep_mask"]
