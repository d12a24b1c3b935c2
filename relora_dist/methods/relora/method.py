"""The LoRA family, one config section (`relora:`): LoRA from scratch (`lora`), LoRA after a full-rank warm start
(`lora_ws`), ReLoRA (Lialin et al., `relora`) and the paper's full-rank Control (`control`).

LoRA and LoRA-WS turn every target projection into a frozen W plus a trainable s·B@A (`layer.py`), never merged.
ReLoRA adds, every --merge-every updates, a merge of s·B@A into W, a fresh A and B = 0, a prune of the A/B optimizer
states and an LR restart on the jagged cosine; merge and prune are written once on the access layer (`merge.py`,
`prune.py`), and the ablation switches (--restarts, --optimizer-reset, --jagged-schedule) turn off one mechanism
each. Control is a full-rank model with the same depth whose size matches what ReLoRA trains at --rank.

The knobs (--rank, --lora-alpha, --lora-dropout, --target-modules, --warm-start-steps, --merge-every, ...) are
`config.ReLoRAConfig`'s.
"""

from __future__ import annotations

from typing import ClassVar

from ...models import control_config
from ...perf.accounting import FROZEN_WITH_ADAPTERS
from ..base import Event, Method, register_method
from ..full import FullRank
from .config import RELORA_RUN_DEFAULTS, ReLoRAConfig
from .layer import lora_parameters, relora_layers, wrap
from .merge import merge_and_reinit_layers, merged_state_dict
from .prune import prune_states
from .schedule import ReLoRAController


@register_method
class Control(FullRank):
    name = "control"
    description = "a full-rank model with the same depth whose size matches what ReLoRA trains at --rank"
    config_section = "relora"  # sized from the ReLoRA rank
    config_class = ReLoRAConfig
    config_defaults = RELORA_RUN_DEFAULTS

    def model_config(self, config):
        return control_config(config, self.settings.rank)


class LowRankAdapters(Method):
    """The family's shared part: wrap at the start of phase 2 (a rebuild event after a warm start), A/B in their
    own optimizer group at --lora-lr, the schedule from the ReLoRA controller, merged export."""

    config_section = "relora"
    config_class = ReLoRAConfig
    config_defaults = RELORA_RUN_DEFAULTS
    cost_traits = FROZEN_WITH_ADAPTERS
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


@register_method
class ReLoRA(LowRankAdapters):
    name = "relora"
    layout = "relora"
    description = "full rank for --warm-start-steps, then ReLoRA in the same run (merges, resets, LR restarts)"

    def after_update(self, step):
        events = super().after_update(step)  # the warm-start switch
        actions = self.controller.actions_after(step - 1)
        if actions.merge:
            events.append(Event("merge", actions.merge_index))
        if actions.reset:
            events.append(Event("reset", actions.reset_index))
        return events

    def apply(self, event, model, access):
        r = self.settings
        if event.name == "merge":
            layers = relora_layers(model)
            merge_and_reinit_layers(layers, access, restart_index=event.index)
            return f"merge #{event.index} ({len(layers)} layers)"
        if event.name == "reset":
            info = prune_states(lora_parameters(model), access, rule=r.prune, ratio=r.prune_ratio, seed=r.seed,
                                restart_index=event.index, reference=r.reference_prune_semantics)
            return f"optimizer reset #{event.index} ({r.prune}, {100 * info['zeroed']:.1f}% of A/B states zero)"
        return super().apply(event, model, access)

    def periodic_events(self):
        r = self.settings
        events = [(Event("merge", 1), r.merge_every)] if r.restarts else []
        return events + ([(Event("reset", 1), r.reset_period)] if r.optimizer_reset else [])
