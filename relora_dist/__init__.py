"""relora_dist: low-rank LLM pre-training (ReLoRA and its baselines; every method behind one interface,
`relora_dist.methods`) on single process, DDP, DeepSpeed ZeRO 0-3, FSDP2 and fairscale.

The library surface below is ReLoRA's building blocks for a loop of your own (see the README's library
example); `relora-train` runs every registered method on every engine.
"""

from . import architectures  # noqa: F401  (CoLA, CoLA-M: registered with transformers' Auto classes)
from .methods.relora.config import LLAMA_PROJECTIONS, ReLoRAConfig
from .methods.relora.layer import ReLoRALinear, lora_parameters, relora_layers, wrap
from .methods.relora.merge import merge_and_reinit, merge_and_reinit_layers
from .methods.relora.prune import prune_adam_states, prune_states
from .methods.relora.schedule import Actions, ReLoRAController, jagged_cosine

__version__ = "0.1.0"

__all__ = [
    "LLAMA_PROJECTIONS",
    "ReLoRAConfig",
    "ReLoRALinear",
    "wrap",
    "relora_layers",
    "lora_parameters",
    "merge_and_reinit",
    "merge_and_reinit_layers",
    "prune_adam_states",
    "prune_states",
    "jagged_cosine",
    "ReLoRAController",
    "Actions",
]
