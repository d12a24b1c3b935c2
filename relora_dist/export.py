"""Export a merged HF LLaMA model (safetensors + tokenizer) that plain `from_pretrained` loads.

An un-merged ReLoRA checkpoint loaded by plain HF code silently drops the last cycle (the lora_* keys
are ignored): exports always fold s*B@A into W first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .backends.base import error_reason, load_checkpoint_file
from .merge import add_in_fp32, lora_delta
from .train.checkpoint import STATE_FILE, read_trainer_state


def merged_state_dict(state: dict[str, torch.Tensor], scale: float | None) -> dict[str, torch.Tensor]:
    """W + scale * B @ A for every (lora_A, lora_B) pair, in W's dtype; lora keys dropped."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            if scale is None:
                raise ValueError("the state dict holds lora_A/lora_B but no ReLoRA scale was given")
            weight = merged[f"{prefix}.weight"].clone()
            add_in_fp32(weight.view(-1), lora_delta(state[f"{prefix}.lora_B"].float(), state[key].float(), scale))
            merged[f"{prefix}.weight"] = weight
    return merged


def export_merged(state: dict[str, torch.Tensor], config: LlamaConfig, tokenizer, out_dir: str | Path, scale: float | None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(config)
    model.load_state_dict(merged_state_dict(state, scale), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _checkpoint_state(path: Path, backend: str | None) -> dict[str, torch.Tensor]:
    if backend == "deepspeed":
        from .backends.deepspeed import consolidated_checkpoint_state

        reader, source = (lambda: consolidated_checkpoint_state(path)), path / "engine"
    elif backend == "fsdp2":
        from .backends.fsdp2 import CHECKPOINT_DIR, consolidated_checkpoint_state

        reader, source = (lambda: consolidated_checkpoint_state(path)), path / CHECKPOINT_DIR
    else:  # ddp, fairscale, zero_redundancy: rank 0 wrote the whole module
        source = path / "model.pt"
        reader = lambda: load_checkpoint_file(source)  # noqa: E731
    if not source.exists():
        raise ValueError(f"{path} has no model state ({source.name} missing; backend {backend!r})")
    try:
        return reader()
    except ValueError:
        raise
    except Exception as e:  # torch/DeepSpeed raise several types for truncated/corrupt files
        raise ValueError(f"checkpoint {source} cannot be read: {error_reason(e)}") from None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """relora-export: a checkpoint directory written by relora-train (any backend) -> merged HF model."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    trainer_state = read_trainer_state(path)
    state = _checkpoint_state(path, trainer_state.get("backend"))
    config = LlamaConfig(**json.loads((path / "model_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return export_merged(state, config, tokenizer, out_dir, trainer_state.get("lora_scale"))


def merged_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The merged weights (s*B@A folded into W) of a relora-train checkpoint (any backend) or of an HF
    safetensors model directory (a relora-export output, or any LLaMA)."""
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"checkpoint not found: {directory}")
    files = sorted(path.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{directory} is neither a relora-train checkpoint ({STATE_FILE}) nor a safetensors model")
    trainer_state = read_trainer_state(path)
    return merged_state_dict(_checkpoint_state(path, trainer_state.get("backend")), trainer_state.get("lora_scale"))
