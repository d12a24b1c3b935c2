"""LoRA (from scratch) and LoRA after a full-rank warm start: every target projection becomes a frozen W plus
a trainable s·B@A (`relora_dist.layer`), never merged. ReLoRA (`relora.py`) extends this with restarts.

The knobs live in the `relora:` config section (--rank, --lora-alpha, --lora-dropout, --target-modules,
--warm-start-steps, ...), shared by the whole family.
"""

from __future__ import annotations

from typing import ClassVar

from ..config import RELORA_RUN_DEFAULTS, ReLoRAConfig
from ..layer import lora_parameters, relora_layers, wrap
from ..merge import merged_state_dict
from ..schedule import ReLoRAController
from .base import Event, Method, register_method


class LowRankAdapters(Method):
    """The family's shared part: wrap at the start of phase 2 (a rebuild event after a warm start), A/B in their
    own optimizer group at --lora-lr, the schedule from the ReLoRA controller, merged export."""

    config_section = "relora"
    config_class = ReLoRAConfig
    config_defaults = RELORA_RUN_DEFAULTS
    cost_structure = "relora"
    layout: ClassVar[str] = "lora"
    """The controller's phase layout (schedule.LAYOUTS): when the low-rank phase starts, whether it restarts."""

    def __init__(self, cfg):
        super().__init__(cfg)
        o = cfg.optim
        # Validates steps, warm start and warm-up against each other (one-line errors naming the flags).
        self.controller = ReLoRAController(self.layout, cfg.train.steps, self.settings, o.warmup_steps, o.min_lr_ratio)

    @property
    def phase2_start(self) -> int:
        """First update taken with the low-rank model."""
        return self.controller.phase2_start

    def phases(self):
        start = self.phase2_start
        return [(0, start), (start, self.total_steps)] if 0 < start < self.total_steps else [(0, self.total_steps)]

    def prepare_model(self, model, step):
        return wrap(model, self.settings) if step >= self.phase2_start else model

    def param_groups(self, model):
        """Full-rank trainables, then A/B as their own named group."""
        lora_ids = {id(p) for _, p in lora_parameters(model)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in lora_ids], "name": "full_rank"}]
        if lora_ids:
            groups.append({"params": [p for p in trainable if id(p) in lora_ids], "name": "lora"})
        return groups

    def lr(self, step):
        o = self.cfg.optim
        base = (o.lora_lr or o.lr) if step >= self.phase2_start else o.lr
        return base * self.controller.lr_factor(step)

    def group_lr(self, step, group):
        """--lora-lr-scope factors: only the `lora` group (A and B) takes --lora-lr; the full-rank group keeps --lr
        on the same restarts (the paper's recipe, `all`, runs every group at `lr(step)`)."""
        if group == "lora" or self.cfg.optim.lora_lr_scope == "all":
            return self.lr(step)
        return self.cfg.optim.lr * self.controller.lr_factor(step)

    def after_update(self, step):
        return [Event("wrap", rebuild=True)] if self.controller.actions_after(step - 1).wrap else []

    def describe_rebuild(self, event, model):
        return f"warm start done, model wrapped ({len(relora_layers(model))} ReLoRA layers)"

    def log_fields(self, step):
        merges, resets = self.controller.counts_after(step - 1)
        return {"merges": merges, "resets": resets, "low_rank": step >= self.phase2_start}

    def dense_state(self, state):
        return merged_state_dict(state, self.settings.scale)


@register_method
class LoRA(LowRankAdapters):
    name = "lora"
    description = "LoRA from scratch, no restarts"


@register_method
class LoRAWarmStart(LowRankAdapters):
    name = "lora_ws"
    layout = "lora_ws"
    description = "full rank for --warm-start-steps, then LoRA without restarts"
