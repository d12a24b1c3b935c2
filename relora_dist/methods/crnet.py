"""CR-Net (Kong et al., arXiv 2509.18993): layer 0 dense, every projection of the later layers the previous layer's
output of that projection times a learned β plus a low-rank difference (`relora_dist.architectures.crnet`). Plain
AdamW, no events: every engine runs it as it runs any model.

The knobs live in the `crnet:` config section (--rank, --crnet-epsilon, --crnet-beta-init, --crnet-recompute-every). The official code could
not be fetched; docs/METHODS.md lists what follows the paper and what is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..architectures.crnet import CRNetForCausalLM, crnet_config
from ..perf.accounting import CostTraits
from .base import Method, register_method


@dataclass
class CRNetSettings:
    """CR-Net's low-rank differences and carried outputs."""

    rank: int | None = None
    """Rank r of every layer's low-rank differences (--rank; default hidden // 4, about half the dense parameters)."""
    epsilon: float = 1e-3
    """ε in β̃ = sign(β)(|β| + ε): how close to zero a carried output's weight may get."""
    beta_init: float = 1.0
    """Initial β of every projection of layers >= 1 (1: each layer starts by carrying the previous one's outputs)."""
    recompute_every: int = 0
    """The paper's inverse recomputation: 0 off (plain autograd); k > 0 recomputes every layer in backward, every k-th
    layer and the last keep the previous layer's outputs, the others rebuild them with Y_{l-1} = (Y_l - X_l A_l B_l) /
    β̃_l and keep 2 hidden-wide tensors a token (1: every layer keeps them, no inverse, exact)."""

    def __post_init__(self):
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"crnet rank must be > 0, got {self.rank} (--rank)")
        if self.epsilon < 0:
            raise ValueError(f"crnet epsilon must be >= 0, got {self.epsilon} (--crnet-epsilon)")
        if self.recompute_every < 0:
            raise ValueError(f"crnet recompute_every must be >= 0, got {self.recompute_every} (--crnet-recompute-every)")


@register_method
class CRNet(Method):
    name = "crnet"
    description = "CR-Net: later layers carry the previous layer's projection outputs plus a low-rank difference"
    config_section = "crnet"
    config_class = CRNetSettings
    # layer 0 dense, the later layers' low-rank differences in place of their projections, β Y_prev carried
    cost_traits = CostTraits(low_rank_factors=True, replaces_dense=True, dense_first_layer=True, carried_outputs=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.settings.recompute_every:  # every layer's forward runs again in backward
            self.cost_traits = replace(CRNet.cost_traits, recompute=True)

    def validate(self):
        super().validate()
        if self.cfg.train.activation_checkpointing:
            raise ValueError("--activation-checkpointing does not reach CR-Net's layers (they pass 7 projection outputs"
                             " between them): use --crnet-recompute-every K for --method crnet")

    def model_config(self, config):
        s = self.settings
        return crnet_config(config, rank=s.rank, epsilon=s.epsilon, beta_init=s.beta_init,
                            recompute_every=s.recompute_every)

    def build_model(self, config):
        return CRNetForCausalLM(config)
