"""One config tree for a training run; YAML files and CLI flags are derived from it.

Precedence: dataclass defaults < YAML (`--config`) < command-line flags. Every flag is generated from
a field (its docstring is the help text); a few get conventional names through FLAG_NAMES.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..backends import BACKENDS
from ..config import ReLoRAConfig

DTYPES = ("fp32", "bf16")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model preset (tiny, debug, 9m ... 7b; SPEC section 5)."""
    config_path: str | None = None
    """HF LLaMA config JSON used instead of the preset (vocab taken from the tokenizer)."""
    max_positions: int = 1024
    """max_position_embeddings for presets."""


@dataclass
class DataConfig:
    dataset: str | None = None
    """Local text/jsonl/parquet file or directory, or a hub name (online only). Default: embedded stdlib docs corpus."""
    tokenizer: str | None = None
    """HF tokenizer path or hub name. Default: byte-level BPE trained locally on the training text (cached)."""
    vocab_size: int = 4096
    """Vocabulary size of the locally trained tokenizer."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    text_field: str = "text"
    """Column holding the text in jsonl/parquet/hub datasets."""
    cache_dir: str | None = None
    """Where tokenizers and packed data are cached (default $RELORA_CACHE or ~/.cache/relora_dist)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (full-rank phase and full-rank methods)."""
    lora_lr: float | None = None
    """Peak learning rate once low-rank (ReLoRA/LoRA phase); default: --lr. The paper uses about 2x."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    warmup_steps: int = 10
    """Linear warm-up of each phase's schedule, in updates."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine envelope, as a fraction of the peak."""
    keep_states_at_switch: bool = False
    """At the warm-start switch keep the Adam states of what stays full-rank (embeddings, head, norms); default: a fresh optimizer, as the reference."""


@dataclass
class TrainConfig:
    method: str = "relora"
    """full | relora | lora | lora_ws | control."""
    backend: str = "ddp"
    """Distributed engine: ddp (single process when world size is 1), deepspeed (needs --deepspeed), fsdp2 (fully_shard per decoder layer), fairscale (OSS + ShardedDDP) or zero_redundancy (DDP + torch ZeroRedundancyOptimizer)."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (ZeRO stage, offload, buckets; see launch/configs/zero*.json). Implies --backend deepspeed."""
    steps: int = 200
    """Optimizer updates in the whole run (warm start included)."""
    global_batch_size: int = 16
    """Sequences per optimizer update, over all ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    dtype: str = "fp32"
    """fp32, or bf16 (ddp, fairscale, zero_redundancy: autocast over fp32 parameters; deepspeed: bf16 parameters with fp32 masters, frozen W in bf16; fsdp2: bf16 compute and all-gathers over fp32 sharded masters, fp32 gradient reduction)."""
    fsdp_reshard_after_forward: bool = True
    """fsdp2: free each layer's gathered parameters after its forward and gather them again for backward (false: keep them, more memory, fewer all-gathers)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (HF non-reentrant gradient checkpointing; any backend)."""
    seed: int = 0
    """Seed of model init, data order, dropout and ReLoRA's generators."""
    eval_every: int = 50
    """Evaluate on the validation split every N updates (0: only at the end)."""
    eval_batches: int = 4
    """Validation set size per evaluation, in global batches (0: the whole split). Independent of world size."""
    save_every: int = 0
    """Write a checkpoint every N updates (0: only at the end)."""
    out: str = "runs/default"
    """Run directory: metrics.jsonl, summary.json, config.yaml, checkpoints/."""
    resume: str | None = None
    """Continue from a checkpoint directory, or 'latest' in OUT/checkpoints; 'auto': the latest if there is one, else start afresh (for launchers that restart failed jobs)."""
    overwrite: bool = False
    """Start afresh in an OUT that already holds a run (its metrics and checkpoints are deleted)."""
    export_merged: str | None = None
    """At the end, write a merged HF model (safetensors + tokenizer) to this directory."""
    max_consecutive_skips: int = 10
    """Abort after this many consecutive updates skipped for a non-finite loss or gradient."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep in OUT/checkpoints (the newest)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    stop_after: int | None = None
    """End this invocation after this many updates in total (checkpoint written), as if preempted; continue with --resume."""
    dist_timeout_s: int = 600
    """Seconds a collective waits for a peer before this rank fails: a dead or hung rank ends the job instead of stalling it."""
    check_replicas: bool = False
    """After every merge/reset, verify that replicated tensors are bit-identical on all ranks (one small all-reduce)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    relora: ReLoRAConfig = field(default_factory=lambda: ReLoRAConfig(rank=8, merge_every=50, restart_warmup_steps=5))

    def validate(self) -> None:
        t = self.train
        if t.deepspeed and t.backend == "ddp":
            t.backend = "deepspeed"
        if t.backend not in BACKENDS:
            raise ValueError(f"unknown backend {t.backend!r}; available: {', '.join(BACKENDS)} (--backend)")
        if t.backend == "deepspeed" and not t.deepspeed:
            raise ValueError("--backend deepspeed needs a DeepSpeed JSON config (--deepspeed launch/configs/zero2.json)")
        if t.backend != "deepspeed" and t.deepspeed:
            raise ValueError(f"--deepspeed was given but --backend is {t.backend}")
        if t.backend != "fsdp2" and not t.fsdp_reshard_after_forward:
            raise ValueError(f"--fsdp-reshard-after-forward applies to --backend fsdp2 only (backend is {t.backend})")
        if t.backend != "ddp" and self.optim.keep_states_at_switch:
            raise ValueError(f"--keep-states-at-switch is not supported with --backend {t.backend} (ddp only)")
        if t.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {t.dtype!r} (--dtype)")
        for name in ("global_batch_size", "micro_batch_size", "steps"):
            if getattr(t, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(t, name)} (--{name.replace('_', '-')})")
        if t.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {t.dist_timeout_s} (--dist-timeout-s)")
        if self.data.seq_len <= 1:
            raise ValueError(f"seq_len must be > 1, got {self.data.seq_len} (--seq-len)")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.data.val_fraction} (--val-fraction)")
        if self.optim.lr <= 0 or (self.optim.lora_lr is not None and self.optim.lora_lr <= 0):
            raise ValueError("learning rates must be > 0 (--lr, --lora-lr)")

    def to_dict(self) -> dict:
        return {section: asdict(getattr(self, section)) | ({"target_modules": list(self.relora.target_modules)} if section == "relora" else {})
                for section in SECTIONS}

    @classmethod
    def from_dict(cls, tree: dict) -> "RunConfig":
        default = cls()
        parts = {}
        for section in SECTIONS:
            values = dict(tree.get(section) or {})
            known = {f.name for f in fields(type(getattr(default, section)))}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown key(s) in config section '{section}': {', '.join(sorted(unknown))}")
            base = asdict(getattr(default, section))
            parts[section] = type(getattr(default, section))(**(base | values))
        extra = set(tree) - set(SECTIONS)
        if extra:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(extra))}; expected {', '.join(SECTIONS)}")
        cfg = cls(**parts)
        cfg.relora.seed = cfg.train.seed
        return cfg


SECTIONS = ("model", "data", "optim", "train", "relora")

# (section, field) -> flag name; None = no flag. Fields not listed get --field-name.
FLAG_NAMES = {
    ("model", "preset"): "model",
    ("model", "config_path"): "model-config",
    ("relora", "alpha"): "lora-alpha",
    ("relora", "dropout"): "lora-dropout",
    ("relora", "seed"): None,  # derived from --seed
}


def flag_for(section: str, name: str) -> str | None:
    return FLAG_NAMES.get((section, name), name.replace("_", "-"))


def save_yaml(cfg: RunConfig, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
