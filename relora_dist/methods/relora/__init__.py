"""The LoRA family (`relora:` config section): lora, lora_ws, relora and control, their layer, merge, prune and
schedule. Importing it registers the four methods."""

from . import method  # noqa: F401  (registration, in --method order: control, lora, lora_ws, relora)
