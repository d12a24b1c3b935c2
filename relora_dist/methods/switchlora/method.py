"""SwitchLoRA (Zhou & Wang, arXiv 2406.06564; v1 "Revolutionizing Large Language Model Training through Dynamic
Parameter Adjustment"): LoRA whose vectors are switched a few at a time before every update, each switched vector's
contribution folded into the frozen W and the vector parked in a candidate pool, its counterpart frozen for
--switchlora-freeze-steps updates with its Adam state restarted. The layer is `layer.py`, the switch `switching.py` (on the
access layer), the optimizer `optimizer.VectorStepAdamW` (a step counter per vector, as the official StepAdamW).

The knobs live in the `switchlora:` config section (--rank, --switchlora-interval, --switchlora-descent-rate,
--switchlora-freeze-steps, --switchlora-switch, --switchlora-alpha, --switchlora-warm-start-steps); defaults are the
official scripts' (interval 40, descent rate 0.1, freeze 5, alpha 1, continuous switching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...access import ReplicatedAccess
from ...perf.accounting import CostTraits
from ..base import Event, Method, register_method
from .layer import switch_layers, switchlora_dense_state, wrap_switchlora
from .optimizer import VectorStepAdamW
from .switching import SwitchSchedule, switch

SWITCHES = ("continuous", "discontinuous")


@dataclass
class SwitchLoRASettings:
    """SwitchLoRA's layers and switching schedule."""

    rank: int = 128
    """Rank r of every LoRA pair (--rank; the official 350M script uses 256)."""
    alpha: float = 1.0
    """Scale numerator: the low-rank path is multiplied by s = alpha / rank (the official code uses 1)."""
    interval: float = 40.0
    """At the start a vector is switched every this many updates (r / interval vectors an update and side)."""
    descent_rate: float = 0.1
    """The switch rate falls to 0.3 of its start after this fraction of the low-rank updates, and on exponentially."""
    freeze_steps: int = 5
    """Updates a switched vector's counterpart stays frozen, its Adam state restarted (the official adam_warm_step)."""
    switch: str = "continuous"
    """continuous: each switched vector takes the pool slot after its predecessor's (official default);
    discontinuous: slots drawn without replacement among the free ones."""
    warm_start_steps: int = 0
    """Full-rank updates before the model is wrapped (0: SwitchLoRA from scratch, as the official scripts)."""
    target_modules: tuple[str, ...] = ("attn", "attention", "mlp")
    """nn.Linear modules whose dotted name contains any of these are wrapped (the official placement)."""

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"switchlora rank must be > 0, got {self.rank} (--rank)")
        if self.freeze_steps < 1:
            raise ValueError(f"switchlora freeze_steps must be >= 1, got {self.freeze_steps} (--switchlora-freeze-steps)")
        if self.interval < 2 * self.freeze_steps:  # the official RuntimeError, found before any work
            raise ValueError(f"switchlora interval {self.interval} must be at least twice the freeze steps"
                             f" ({self.freeze_steps}) (--switchlora-interval)")
        if not self.descent_rate > 0:
            raise ValueError(f"switchlora descent_rate must be > 0, got {self.descent_rate} (--switchlora-descent-rate)")
        if self.switch not in SWITCHES:
            raise ValueError(f"switchlora switch must be one of {', '.join(SWITCHES)}, got {self.switch!r}"
                             f" (--switchlora-switch)")
        if self.warm_start_steps < 0:
            raise ValueError(f"switchlora warm_start_steps must be >= 0, got {self.warm_start_steps}"
                             f" (--switchlora-warm-start-steps)")
        self.target_modules = tuple(self.target_modules)


@register_method
class SwitchLoRA(Method):
    name = "switchlora"
    description = "SwitchLoRA: LoRA vectors switched with candidate pools every update (Zhou & Wang 2024)"
    config_section = "switchlora"
    config_class = SwitchLoRASettings
    # Frozen W with factors beside it; the candidate pools held (frozen), W and the pools rewritten every update, a
    # step counter per factor element in the optimizer (VectorStepAdamW).
    cost_traits = CostTraits(frozen_weights=True, low_rank_factors=True, candidate_pools=True, rewrites_frozen=True,
                             factor_step_counters=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        s = self.settings
        self.start = min(s.warm_start_steps, self.total_steps)
        self.schedule = SwitchSchedule(interval=s.interval, descent_steps=s.descent_rate * max(self.total_steps - self.start, 1),
                                       freeze_steps=s.freeze_steps, continuous=s.switch == "continuous")
        # One stream for every draw of the switch, identical on every rank (the official code uses numpy's global RNG).
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.switched_for = -1  # the update whose switch has been applied
        self.last_switched = 0

    def validate(self):
        super().validate()
        if self.start >= self.total_steps and self.total_steps > 0:
            raise ValueError(f"switchlora warm_start_steps {self.start} leaves no SwitchLoRA update of {self.total_steps}"
                             f" (--switchlora-warm-start-steps)")

    def phases(self):
        return [(0, self.start), (self.start, self.total_steps)] if 0 < self.start < self.total_steps else [(0, self.total_steps)]

    # -- the model ------------------------------------------------------------------------------------
    def prepare_model(self, model, step):
        if step < self.start:
            return model
        s = self.settings
        layers = wrap_switchlora(model, target_modules=s.target_modules, rank=s.rank, alpha=s.alpha, seed=self.cfg.train.seed)
        if self.switched_for < step and not any(p.is_meta for p in model.parameters()):
            # The switch before the phase's first update, on the plain model (a resume loads it done).
            self.last_switched = switch(layers, ReplicatedAccess(), step - self.start, self.schedule, self.generator,
                                        updates_done=0)
            self.switched_for = step
        return model

    def param_groups(self, model):
        """Full-rank trainables (embeddings, norms, head) in one group; A and B, with a step counter per vector."""
        lora = {id(p) for layer in switch_layers(model) for p in (layer.lora_A, layer.lora_B)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in lora], "name": "full_rank"}]
        if lora:
            groups.append({"params": [p for p in trainable if id(p) in lora], "name": "lora", "vector_steps": True})
        return groups

    def make_optimizer(self, groups):
        o = self.cfg.optim
        return VectorStepAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    def resolved_rank(self, config):
        return self.settings.rank

    # -- events ---------------------------------------------------------------------------------------
    def after_update(self, step):
        if step >= self.total_steps:
            return []
        if step == self.start and self.start > 0:
            return [Event("wrap", rebuild=True)]  # prepare_model wraps and switches for this update
        return [Event("switch", step, routine=True)] if step > self.start else []

    def apply(self, event, model, access):
        if event.name != "switch":
            return super().apply(event, model, access)
        layers = switch_layers(model)
        self.last_switched = switch(layers, access, event.index - self.start, self.schedule, self.generator)
        self.switched_for = event.index
        return f"switch before update {event.index}: {self.last_switched} vectors"

    def describe_rebuild(self, event, model):
        return f"warm start done, model wrapped ({len(switch_layers(model))} SwitchLoRA layers)"

    def log_fields(self, step):
        return {"switched": self.last_switched, "low_rank": step >= self.start}

    def periodic_events(self):
        return [(Event("switch", 1), 1)]

    # -- checkpoints and export -----------------------------------------------------------------------
    def state_dict(self):
        return {"generator": self.generator.get_state(), "switched_for": self.switched_for,
                "last_switched": self.last_switched}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.switched_for, self.last_switched = int(state["switched_for"]), int(state["last_switched"])

    def dense_state(self, state):
        return switchlora_dense_state(state, self.settings.alpha / self.settings.rank)
