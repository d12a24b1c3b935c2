"""Control (the paper's Table 2): a full-rank model with the same depth whose size matches what ReLoRA trains."""

from __future__ import annotations

from ..config import RELORA_RUN_DEFAULTS, ReLoRAConfig
from ..models import control_config
from .base import register_method
from .full import FullRank


@register_method
class Control(FullRank):
    name = "control"
    description = "a full-rank model with the same depth whose size matches what ReLoRA trains at --rank"
    config_section = "relora"  # sized from the ReLoRA rank
    config_class = ReLoRAConfig
    config_defaults = RELORA_RUN_DEFAULTS

    def model_config(self, config):
        return control_config(config, self.settings.rank)
