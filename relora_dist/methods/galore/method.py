"""GaLore (Zhao et al. 2024, arXiv 2403.03507) and Fira (Chen et al. 2024, arXiv 2410.01623): the model trains at full
rank, and the optimizer keeps its Adam moments in a rank-r projection of each attention and MLP weight's gradient,
refreshed from the gradient's SVD every --galore-update-gap steps. Fira adds the part of the gradient outside the
subspace back, scaled by the Adam-to-SGD norm ratio and held by a norm-growth limiter. One optimizer,
`optimizer.ProjectedAdamW`, with Fira as its residual switch; no events, no model surgery.

The knobs live in the `galore:` config section, shared by both (--rank, --galore-update-gap, --galore-scale,
--galore-proj, --fira-limiter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...perf.accounting import CostTraits
from ..base import Method, register_method
from .optimizer import PROJECTIONS, ProjectedAdamW

# The official scripts' rank by hidden size (60M, 130M, 350M, 1B; the GaLore paper's 1B row uses 512).
OFFICIAL_RANKS = {512: 128, 768: 256, 1024: 256, 2048: 512}
# Modules whose Linear weights are projected, as the official scripts pick them: the name contains one of these.
TARGET_KEYS = ("attn", "mlp")


@dataclass
class GaLoreSettings:
    """The gradient projection of GaLore and Fira."""

    rank: int | None = None
    """Rank r of every projected gradient (--rank). Default: the official scripts' rank for the model's hidden size
    (512: 128, 768: 256, 1024: 256, 2048: 512), else hidden // 4."""
    update_gap: int = 200
    """T: a new projector from the gradient's SVD at the optimizer's own steps 0, T, 2T, ..."""
    scale: float = 0.25
    """alpha, applied to the back-projected update (and, for Fira, to the in-subspace part it subtracts)."""
    proj: str = "std"
    """std: project each matrix on its smaller side (down_proj from the left), as the official code; right or left:
    every matrix from that side (right: no per-step collective for any matrix on the engines that split rows, a
    named variant of the method). Every engine runs the projection named here (docs/METHODS.md)."""
    limiter: float = 1.01
    """Fira's norm-growth limiter gamma: the residual's norm may grow by at most this factor a step (--method fira)."""

    def __post_init__(self):
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"galore rank must be > 0, got {self.rank} (--rank)")
        if self.update_gap <= 0:
            raise ValueError(f"galore update_gap must be > 0, got {self.update_gap} (--galore-update-gap)")
        if self.scale <= 0:
            raise ValueError(f"galore scale must be > 0, got {self.scale} (--galore-scale)")
        if self.proj not in PROJECTIONS:
            raise ValueError(f"galore proj must be one of {', '.join(PROJECTIONS)}, got {self.proj!r} (--galore-proj)")
        if self.limiter < 1.0:
            raise ValueError(f"fira limiter must be >= 1, got {self.limiter} (--fira-limiter)")


def projected_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every Linear in an attention or MLP block: what GaLore projects."""
    return [(f"{name}.weight", module.weight) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(key in name for key in TARGET_KEYS) and module.weight.requires_grad]


def galore_rank(rank: int | None, hidden: int) -> int:
    return rank if rank is not None else OFFICIAL_RANKS.get(hidden, hidden // 4)


@register_method
class GaLore(Method):
    name = "galore"
    description = "GaLore: full-rank model, Adam moments in a rank-r SVD projection of each gradient (Zhao et al. 2024)"
    config_section = "galore"
    config_class = GaLoreSettings
    cost_traits = CostTraits(projected_state=True)  # the full-rank model; rank-r moments and a projector per matrix
    residual: ClassVar[str] = "none"

    def resolved_rank(self, config):
        return galore_rank(self.settings.rank, config.hidden_size)

    def param_groups(self, model):
        """The dense parameters (embeddings, norms, head) in plain AdamW, then the projected matrices, as the official
        scripts order them; both at the run's learning rate."""
        projected = {id(p) for _, p in projected_weights(model)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        s = self.settings
        return [{"params": [p for p in trainable if id(p) not in projected], "name": "full_rank"},
                {"params": [p for p in trainable if id(p) in projected], "name": "projected",
                 "rank": self.resolved_rank(model.config), "update_gap": s.update_gap, "scale": s.scale,
                 "proj": s.proj, "residual": self.residual, "limiter": s.limiter}]

    def make_optimizer(self, groups):
        o = self.cfg.optim
        return ProjectedAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


@register_method
class Fira(GaLore):
    name = "fira"
    description = "Fira: GaLore plus the out-of-subspace gradient, norm-scaled and growth-limited (Chen et al. 2024)"
    residual = "fira"
