"""relora_dist's methods inside other training frameworks: `integrations.transformers` (Hugging Face Trainer on its own
DDP, DeepSpeed and FSDP2 paths). An integration names no method and reaches engines through the engine registry."""
