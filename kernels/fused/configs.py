"""Tile configurations of the fused ReLoRA kernels, per GPU architecture, and the interpreter's fixed one.

Starting points from research/fused_kernels.md section 3.4 (LoRAFusion's H100/A100 tiles, the register and
shared-memory budgets measured by compiling for sm_80/sm_90 on a CPU). `compile_report.py`
compiles every entry offline (`python -m relora_dist.kernels.compile_report`) and reports registers, spills and shared memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


# K2 (forward GEMM: BN output columns, BK the reduction step). No entry may spill (compile_report.py checks).
MAIN = {
    90: [Tiles(128, 256, 64, 8, 3), Tiles(128, 128, 64, 4, 4), Tiles(64, 256, 64, 4, 4)],
    80: [Tiles(128, 128, 32, 8, 4), Tiles(128, 128, 64, 8, 3), Tiles(64, 128, 32, 4, 4)],
}
# K4 (dx GEMM: BK output columns, BN the reduction step over dy @ W; dA in the epilogue needs more registers).
DX = {
    90: [Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 64, 8, 4), Tiles(64, 256, 64, 8, 3)],
    80: [Tiles(128, 128, 32, 8, 4), Tiles(128, 64, 32, 4, 4), Tiles(64, 128, 32, 4, 4)],
}
# K1 (down projection, memory-bound; Philox tiles kept small: BM*BK / (32 * warps) <= 32) and K3 (dt/dB).
DOWN = {90: [Tiles(64, 0, 64, 4, 3), Tiles(128, 0, 64, 8, 3)], 80: [Tiles(64, 0, 64, 4, 3), Tiles(128, 0, 64, 8, 3)]}
DSDB = {90: [Tiles(128, 128, 0, 8, 3), Tiles(64, 128, 0, 4, 3)], 80: [Tiles(128, 64, 0, 4, 3), Tiles(128, 64, 0, 8, 3)]}

# Shared memory per block the configs must fit (H100 232,448 B; A100 166,912 B).
SHARED_LIMIT = {80: 166_912, 90: 232_448}

# Under TRITON_INTERPRET=1 autotune does not run and cost grows as tile^-3: one small fixed config.
INTERPRETER = Tiles(32, 32, 32, 4, 1)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rank_block(r_pad: int) -> int:
    """Rank chunk per tl.dot: r is padded to a multiple of 16 (tl.dot needs every dim >= 16 on the GPU)."""
    return min(r_pad, 64)


def pad_rank(r: int) -> int:
    return max(16, -(-r // 16) * 16)


def for_arch(table: dict[int, list[Tiles]], arch: int) -> list[Tiles]:
    """The entries for the nearest architecture at or below `arch` (sm_89 -> sm_80, sm_100 -> sm_90)."""
    known = sorted(a for a in table if a <= arch)
    return table[known[-1] if known else min(table)]
