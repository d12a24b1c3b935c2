"""CoLA and CoLA-M (Liu et al. 2025, arXiv 2502.10940): the model itself is low rank. Every projection of the
LLaMA becomes the bottleneck σ(x A) B (`relora_dist.architectures.cola`); CoLA-M is the same parameters with the
decoder layers re-cut at the r-wide activations and recomputed in backward. Both train with plain AdamW and have
no events: every engine runs them as it runs any model.

The knobs live in the `cola:` config section (--rank, --cola-only-lr-act).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..architectures.cola import ColaForCausalLM, ColaMForCausalLM, cola_config
from ..perf.accounting import CostTraits
from .base import Method, register_method


@dataclass
class CoLAConfig:
    """The CoLA bottleneck of every projection."""

    rank: int | None = None
    """Bottleneck width r of every projection (--rank). Default: the official config of the model's hidden size
    (512: 128, 768: 256, 1024: 256, 2048: 512, 4096: 1024), else hidden // 4."""
    only_lr_act: bool | None = None
    """Drop SwiGLU's outer SiLU, so σ acts only inside each bottleneck. Default: as the official configs, on from
    hidden 1024 (350M) up, off below (60M, 130M)."""

    def __post_init__(self):
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"cola rank must be > 0, got {self.rank} (--rank)")


@register_method
class CoLA(Method):
    name = "cola"
    description = "CoLA: every projection a low-rank bottleneck σ(xA)B (Liu et al. 2025)"
    config_section = "cola"
    config_class = CoLAConfig
    cost_traits = CostTraits(low_rank_factors=True, replaces_dense=True, factor_activation=True)  # σ(x A) B
    architecture: ClassVar[type] = ColaForCausalLM

    def model_config(self, config):
        s = self.settings
        return cola_config(config, rank=s.rank, only_lr_act=s.only_lr_act,
                           memory_efficient=self.architecture is ColaMForCausalLM)

    def build_model(self, config):
        return self.architecture(config)


@register_method
class CoLAM(CoLA):
    name = "cola_m"
    description = "CoLA-M: CoLA with layers re-cut at the low-rank activations and recomputed in backward"
    # every layer's forward again in backward, in segments cut at the r-wide activations
    cost_traits = CostTraits(low_rank_factors=True, replaces_dense=True, factor_activation=True, recompute=True,
                             recompute_at_factors=True)
    architecture = ColaMForCausalLM

    def validate(self):
        super().validate()
        if self.cfg.train.activation_checkpointing:
            raise ValueError("--method cola_m recomputes its layers by construction: drop --activation-checkpointing"
                             " (or use --method cola with it)")
