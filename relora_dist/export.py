"""relora-export: a merged HF model (safetensors + tokenizer) from a relora-train checkpoint (LLaMA, or the
architecture the method built: CoLA, CoLA-M).

An un-merged ReLoRA checkpoint loaded by plain HF code silently drops the last cycle (the lora_* keys
are ignored): exports always go through the method's `dense_state` (ReLoRA folds s*B@A into W first).
The engine that wrote the checkpoint reads it (`Backend.read_checkpoint_model`), the method from the
checkpoint's own config turns it into the plain model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .backends import backend_class
from .backends.base import error_reason
from .methods import build_method
from .models import config_from_dict, save_hf_model
from .train.arguments import load_yaml
from .train.checkpoint import STATE_FILE, NotACheckpointError, find_checkpoint, read_trainer_state
from .train.config import RunConfig


def _checkpoint_state(path: Path, backend: str | None) -> dict[str, torch.Tensor]:
    engine = backend_class(backend or "ddp")
    source = engine.checkpoint_model_source(path)
    if not source.exists():
        raise ValueError(f"{path} has no model state ({source.name} missing; backend {backend!r})")
    try:
        return engine.read_checkpoint_model(path)
    except ValueError:
        raise
    except Exception as e:  # torch/DeepSpeed raise several types for truncated/corrupt files
        raise ValueError(f"checkpoint {source} cannot be read: {error_reason(e)}") from None


def _dense_state(path: Path) -> dict[str, torch.Tensor]:
    """The plain model's weights of a checkpoint, through the method that trained it."""
    trainer_state = read_trainer_state(path)
    state = _checkpoint_state(path, trainer_state.get("backend"))
    config = path / "config.yaml"
    if not config.is_file():
        raise ValueError(f"checkpoint {path} has no config.yaml: cannot tell how {trainer_state.get('method')!r} exports")
    return build_method(RunConfig.from_dict(load_yaml(str(config)))).dense_state(state)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """relora-export: a checkpoint written by relora-train (any backend) -> merged HF model. `checkpoint` is a
    checkpoint directory, the `latest` pointer file, a checkpoints folder or a run directory (`find_checkpoint`)."""
    path = find_checkpoint(checkpoint)
    state = _dense_state(path)
    config = config_from_dict(json.loads((path / "model_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return save_hf_model(state, config, tokenizer, out_dir)


def merged_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The merged weights (s*B@A folded into W) of a relora-train checkpoint (any backend; given as `find_checkpoint`
    takes it) or of an HF safetensors model directory (a relora-export output, or any LLaMA)."""
    from safetensors.torch import load_file

    path = Path(directory)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    try:
        checkpoint = find_checkpoint(path)
    except NotACheckpointError:
        raise ValueError(f"{directory} is neither a relora-train checkpoint ({STATE_FILE}), run directory or"
                         " checkpoints folder, nor a safetensors model") from None
    return _dense_state(checkpoint)
