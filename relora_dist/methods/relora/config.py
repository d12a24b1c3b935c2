"""The `relora:` config section (ReLoRA and its baselines: LoRA, LoRA + warm start, Control), validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ...models import LLAMA_PROJECTIONS

PRUNE_RULES = ("reset", "random", "magnitude")
FUSED_MODES = ("auto", "on", "off")
DROPOUT_MASKS = ("aten", "bits16")  # dropout.py

PruneRule = Literal["reset", "random", "magnitude"]


@dataclass
class ReLoRAConfig:
    """What ReLoRA does to a model and when (SPEC section 1).

    Periods count optimizer updates of the ReLoRA phase (after the warm start), never micro-batches.
    """

    rank: int = 128
    """Rank r of every low-rank pair (A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale numerator: the low-rank path is multiplied by s = alpha / rank."""
    dropout: float = 0.1
    """Dropout on the input of the low-rank path only."""
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    """nn.Linear modules whose dotted name contains any of these substrings are wrapped."""
    merge_every: int = 1000
    """Merge s*B@A into W and re-draw A, B=0 every this many updates."""
    reset_every: int | None = None
    """Prune the Adam states of A/B and restart the LR every this many updates (default: merge_every)."""
    restart_warmup_steps: int = 100
    """Linear LR re-warm-up length after each restart (LR is exactly 0 at the restart)."""
    prune: PruneRule = "magnitude"
    """How the Adam states of A/B are pruned at a reset: reset (zero), random, magnitude."""
    prune_ratio: float = 0.9
    """Fraction of entries zeroed by random/magnitude pruning (ignored by reset)."""
    warm_start_steps: int = 0
    """Full-rank updates before the model is wrapped (0 = ReLoRA from scratch)."""
    restarts: bool = True
    """Ablation switch (the paper's 'restarts'): merge s*B@A into W and re-init A, B every merge_every updates."""
    optimizer_reset: bool = True
    """Ablation switch ('optimizer reset'): prune the Adam states of A/B every reset_every updates."""
    jagged_schedule: bool = True
    """Ablation switch ('jagged schedule'): LR to 0 and a re-warm-up every reset_every updates; off: one warm-up + cosine."""
    seed: int = 0
    """Seed of the dedicated generators for re-init and random masks (never the global RNG)."""
    reference_prune_semantics: bool = False
    """Reproduce the authors' code: independent masks for exp_avg and exp_avg_sq, thresholds per key."""
    shared_lora_input: bool = False
    """Projections that read the same input (q/k/v; gate/up) share one dropout mask of it and one down-projection GEMM x [A_q; A_k; A_v]^T (off: one mask and one GEMM per module, as the authors and PEFT do). Unfused path only: where the fused kernels run (--fused-kernels on, or auto on a GPU) each module computes its own."""
    dropout_mask: str = "aten"
    """How the LoRA input dropout draws its mask: aten (nn.Dropout, as the authors and PEFT do) or bits16 (16 random bits an element, one 64-bit draw per four: p rounded to a multiple of 2**-16; on one CPU core 3.9 ns an element forward where ATen takes 13.8; relora_dist.dropout). Unfused path only, as for --shared-lora-input."""
    fused_kernels: str = "auto"
    """Fused Triton forward/backward of ReLoRALinear (B@A never formed): auto (CUDA inputs with triton installed), on, off. On a CPU the fused path runs only under TRITON_INTERPRET=1."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank <= 0:
            raise ValueError(f"relora rank must be > 0, got {self.rank} (--rank)")
        if self.alpha <= 0:
            raise ValueError(f"relora alpha must be > 0, got {self.alpha} (--lora-alpha)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout} (--lora-dropout)")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be non-empty strings, got {self.target_modules!r}")
        if self.merge_every <= 0 or self.reset_period <= 0:
            raise ValueError(
                f"merge_every and reset_every must be > 0, got {self.merge_every} and {self.reset_period}"
                " (--merge-every, --reset-every)"
            )
        if self.restart_warmup_steps < 0:
            raise ValueError(f"restart_warmup_steps must be >= 0, got {self.restart_warmup_steps}")
        for name, period in (("merge_every", self.merge_every), ("reset_every", self.reset_period)):
            if period < self.restart_warmup_steps:
                raise ValueError(
                    f"{name} ({period} updates) must be >= the restart warm-up ({self.restart_warmup_steps})"
                    f" (--{name.replace('_', '-')}, --restart-warmup-steps)"
                )
        if self.prune not in PRUNE_RULES:
            raise ValueError(f"prune must be one of {', '.join(PRUNE_RULES)}, got {self.prune!r} (--prune)")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune ratio must be in [0, 1), got {self.prune_ratio} (--prune-ratio)")
        if self.fused_kernels not in FUSED_MODES:
            raise ValueError(f"fused_kernels must be one of {', '.join(FUSED_MODES)}, got {self.fused_kernels!r} (--fused-kernels)")
        if self.shared_lora_input and self.fused_kernels == "on":
            raise ValueError("shared_lora_input is for the unfused path; the fused kernels compute each module's x A^T"
                             " themselves (--shared-lora-input, --fused-kernels)")
        if self.dropout_mask not in DROPOUT_MASKS:
            raise ValueError(f"lora dropout mask must be one of {', '.join(DROPOUT_MASKS)}, got {self.dropout_mask!r}"
                             " (--lora-dropout-mask)")
        if self.dropout_mask != "aten" and self.fused_kernels == "on":
            raise ValueError(f"lora dropout mask {self.dropout_mask} is for the unfused path; the fused kernels draw"
                             " their own (--lora-dropout-mask, --fused-kernels)")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0, got {self.warm_start_steps} (--warm-start-steps)")

    @property
    def reset_period(self) -> int:
        """Updates between optimizer resets and LR restarts (reset_every, else merge_every)."""
        return self.merge_every if self.reset_every is None else self.reset_every

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# relora-train's defaults for the section (CPU-sized); the dataclass keeps the paper's.
RELORA_RUN_DEFAULTS = {"rank": 8, "merge_every": 50, "restart_warmup_steps": 5}

__all__ = ["ReLoRAConfig", "LLAMA_PROJECTIONS", "PRUNE_RULES", "RELORA_RUN_DEFAULTS"]
