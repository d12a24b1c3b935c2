"""ReLoRA with the input embeddings frozen, keeping a little state of its own (a tensor of the restart indices of the
events applied so far) so that its checkpointing is exercised too, and logging it with every update."""

import torch

from relora_dist.methods.base import register_method
from relora_dist.methods.relora import ReLoRA


@register_method
class FrozenEmbeddingsReLoRA(ReLoRA):
    name = "relora_frozen_embeddings"
    description = "ReLoRA with the input embeddings frozen (a test-only method)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.event_steps = torch.zeros(0, dtype=torch.int64)

    def prepare_model(self, model, step):
        model = super().prepare_model(model, step)
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def apply(self, event, model, access):
        message = super().apply(event, model, access)
        self.event_steps = torch.cat([self.event_steps, torch.tensor([event.index])])
        return message

    def log_fields(self, step):
        return super().log_fields(step) | {"events_applied": int(self.event_steps.numel())}

    def state_dict(self):
        return {"event_steps": self.event_steps.clone(), "version": 1}

    def load_state_dict(self, state):
        self.event_steps = state["event_steps"].clone()
