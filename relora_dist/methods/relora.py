"""ReLoRA (Lialin et al.): LoRA after a full-rank warm start, with every --merge-every updates a merge of
s·B@A into W, a fresh A and B = 0, a prune of the A/B optimizer states and an LR restart on the jagged
cosine. Merge and prune are written once on the access layer (`relora_dist.merge`, `relora_dist.prune`).
The ablation switches (--restarts, --optimizer-reset, --jagged-schedule) turn off one mechanism each.
"""

from __future__ import annotations

from ..layer import lora_parameters, relora_layers
from ..merge import merge_and_reinit_layers
from ..prune import prune_states
from .base import Event, register_method
from .lora import LowRankAdapters


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
