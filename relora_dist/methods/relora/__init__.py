"""The LoRA family (`relora:` config section): lora, lora_ws, relora and control, their layer, merge, prune and
schedule. Importing it registers the four methods; its public names are what another family may extend."""

from .method import Control, LoRA, LoRAWarmStart, LowRankAdapters, ReLoRA

__all__ = ["Control", "LoRA", "LoRAWarmStart", "LowRankAdapters", "ReLoRA"]
