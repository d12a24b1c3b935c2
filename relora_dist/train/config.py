"""One config tree for a training run; YAML files and CLI flags are derived from it.

Sections: model, data, optim, train (the loop), then one per engine that has options (from the backend
registry: ddp, fsdp2, deepspeed) and one per method family (from the method registry: relora). A YAML
file uses the section names as top-level keys.

Precedence: dataclass defaults < relora-train's section defaults < YAML (`--config`) < command-line flags.
Every flag is generated from a field (its docstring is the help text); a few get conventional names
through FLAG_NAMES, and the `relora:` section keeps its historical bare flags (--merge-every, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..backends import BACKENDS, backend_class, option_sections
from ..data.corpus import builtin_corpus_name
from ..data.mixture import parse_mixture
from ..methods import method_class, method_names, method_sections
from ..metrics.reporters import check_report_to, reporter_names

DTYPES = ("fp32", "bf16")
LORA_LR_SCOPES = ("all", "factors")  # --lora-lr-scope: the paper's recipe, or the low-rank factors only


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model preset (tiny, debug, 9m ... 7b; SPEC section 5)."""
    config_path: str | None = None
    """HF LLaMA config JSON used instead of the preset (vocab taken from the tokenizer)."""
    max_positions: int = 1024
    """max_position_embeddings for presets."""
    vocab_size: int | None = None
    """Rows of the embedding and the head; default: the tokenizer's vocabulary (a larger value pads them, e.g. to a multiple of 64)."""


@dataclass
class DataConfig:
    dataset: str | None = None
    """A token store (relora-data prepare), a mixture of stores STORE=WEIGHT,... (relative weights), or raw text, prepared into a store in the cache on first use: a local text/jsonl/parquet file or directory, a hub name (online only), or builtin:NAME, a corpus this Python holds: builtin:stdlib-docs (the default: stdlib docs, 2.1 MB) or builtin:stdlib-source (stdlib source outside its tests, 11.5 MB)."""
    tokenizer: str | None = None
    """HF tokenizer path or hub name. Default: a store's own; for raw text a byte-level BPE trained locally on the training text (cached)."""
    vocab_size: int = 4096
    """Vocabulary size of the locally trained tokenizer."""
    seq_len: int = 128
    """Tokens per training sequence, cut from the store's token stream (documents separated by eos)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    text_field: str = "text"
    """Column holding the text in jsonl/parquet/hub datasets."""
    cache_dir: str | None = None
    """Where the embedded corpus and the stores prepared from raw --dataset text are cached (default $RELORA_CACHE or ~/.cache/relora_dist)."""
    loader_workers: int | None = None
    """DataLoader worker processes that read and pin the next updates' batches while a step runs; default 2 on a GPU, 0 on a CPU (the loop reads them itself)."""

    def __post_init__(self):
        # A YAML mixture may be a mapping {store: weight}: kept as the flag's STORE=WEIGHT,... form.
        if isinstance(self.dataset, dict):
            self.dataset = ",".join(f"{store}={weight}" for store, weight in self.dataset.items())


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (full-rank phase and full-rank methods)."""
    lora_lr: float | None = None
    """Peak learning rate once low-rank (ReLoRA/LoRA phase); default: --lr. The paper uses about 2x."""
    lora_lr_scope: str = "all"
    """What trains at --lora-lr once low-rank: all (the paper's recipe: every trainable parameter, embeddings, head and norms included) or factors (only the low-rank factors; the rest keeps --lr)."""
    non_projection_lr_scale: float = 1.0
    """Multiplier of the learning rate of every parameter outside the attention and MLP projections (embeddings, head, norms), for every method: 1 keeps one rate, as the methods' official recipes; relora-compare's <row>@np<k> rows (full@np4 by default) give every row, full rank included, the freedom GaLore's recipe gives its dense parameters."""
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
    """Training method (relora-train --help lists them; README: Methods)."""
    backend: str = "ddp"
    """Distributed engine: ddp (single process when world size is 1), deepspeed (needs --deepspeed), fsdp2 (fully_shard per decoder layer), fairscale (OSS + ShardedDDP) or zero_redundancy (DDP + torch ZeroRedundancyOptimizer)."""
    steps: int = 200
    """Optimizer updates in the whole run (warm start included)."""
    global_batch_size: int = 16
    """Sequences per optimizer update, over all ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    dtype: str = "fp32"
    """fp32, or bf16 (ddp, fairscale, zero_redundancy: autocast over fp32 parameters; deepspeed: bf16 parameters with fp32 masters, frozen W in bf16; fsdp2: bf16 compute and all-gathers over fp32 sharded masters, fp32 gradient reduction)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (HF non-reentrant gradient checkpointing; any backend)."""
    compile: bool = False
    """torch.compile each decoder layer before the engine wraps the model (as torchtitan); parameters are graph inputs, so merges and resets recompile nothing. On a CPU, Inductor needs a C++ compiler (g++ or clang++)."""
    compile_backend: str = "inductor"
    """torch.compile backend of --compile: inductor (generated kernels), aot_eager (traced, no code generation) or any registered backend."""
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
    report_to: str = "none"
    """Where metrics go besides OUT/metrics.jsonl: tensorboard (event files in OUT/tensorboard), wandb (WANDB_MODE=offline works without a network), both comma-separated, or none. Rank 0 only; a resumed run logs every step once."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per rank for the mfu/hfu columns (default: the GPU's dense bf16 peak; on a CPU a GEMM measured at start)."""
    keep_host_memory: bool = True
    """On a CPU with glibc: keep freed activation memory in the process (fixed mmap and trim thresholds) instead of page-faulting it in again every update; 10-15% faster on a 2-core box (relora_dist/host_memory.py). false: glibc's defaults."""



CORE_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}

# Keys that moved into an engine section; old YAML files and checkpoints keep working.
MOVED_KEYS = {("train", "deepspeed"): ("deepspeed", "config"),
              ("train", "fsdp_reshard_after_forward"): ("fsdp2", "reshard_after_forward")}


def engine_users(section: str) -> list[str]:
    """The engines whose options live in config section `section`."""
    return [b for b in BACKENDS if backend_class(b).options_section == section]


def section_specs() -> dict[str, tuple[type, dict]]:
    """Section name -> (dataclass, relora-train's defaults for it), in YAML/flag order."""
    specs = {name: (cls, {}) for name, cls in CORE_SECTIONS.items()}
    specs.update({name: (cls, {}) for name, cls in option_sections().items()})
    specs.update(method_sections())
    return specs


class RunConfig:
    """The resolved settings of one run: one attribute per section (cfg.train, cfg.relora, cfg.fsdp2, ...)."""

    def __init__(self, **sections):
        for name, (cls, defaults) in section_specs().items():
            value = sections.pop(name, None)
            setattr(self, name, value if value is not None else cls(**defaults))
        if sections:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(sections))}")
        self._derive()

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(section_specs())

    def _derive(self) -> None:
        # Method sections with a seed take the run's (--seed): one seed for init, data and method randomness.
        for name in method_sections():
            section = getattr(self, name)
            if hasattr(section, "seed"):
                section.seed = self.train.seed

    def validate(self) -> None:
        """Everything that does not need the world size, the data or the model (see train/preflight.py)."""
        t = self.train
        for name in BACKENDS:  # an engine whose own option was set is selected by it (--deepspeed)
            engine = backend_class(name)
            if engine.implied_by and t.backend == "ddp" and getattr(getattr(self, engine.options_section), engine.implied_by):
                t.backend = name
        if t.method not in method_names():
            raise ValueError(f"unknown method {t.method!r}; choose one of {', '.join(method_names())} (--method)")
        engine = backend_class(t.backend)  # unknown backend: one line
        for section, cls in option_sections().items():
            if engine.options_section == section:
                continue
            values, default = asdict(getattr(self, section)), asdict(cls())
            for key in values:
                if values[key] != default[key]:
                    raise ValueError(f"{option_flag(section, key)} was given but --backend is {t.backend}: it applies to"
                                     f" --backend {', '.join(engine_users(section))} only")
        if self.optim.keep_states_at_switch and not engine.carries_states:
            carriers = [b for b in BACKENDS if backend_class(b).carries_states]
            raise ValueError(f"--keep-states-at-switch is not supported with --backend {t.backend} ({', '.join(carriers)} only)")
        if t.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {t.dtype!r} (--dtype)")
        for name in ("global_batch_size", "micro_batch_size", "steps"):
            if getattr(t, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(t, name)} (--{name.replace('_', '-')})")
        check_report_to(reporter_names(t.report_to))
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {t.peak_tflops} (--peak-tflops)")
        if t.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {t.dist_timeout_s} (--dist-timeout-s)")
        for dataset in _datasets(self.data.dataset):
            builtin_corpus_name(dataset)  # an unknown builtin:NAME, before any rank loads data
        if self.data.loader_workers is not None and self.data.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.data.loader_workers} (--loader-workers)")
        if self.model.vocab_size is not None and self.model.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.model.vocab_size} (--model-vocab-size)")
        if self.data.seq_len <= 1:
            raise ValueError(f"seq_len must be > 1, got {self.data.seq_len} (--seq-len)")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.data.val_fraction} (--val-fraction)")
        if self.optim.lr <= 0 or (self.optim.lora_lr is not None and self.optim.lora_lr <= 0):
            raise ValueError("learning rates must be > 0 (--lr, --lora-lr)")
        if not self.optim.non_projection_lr_scale > 0:
            raise ValueError(f"non_projection_lr_scale must be > 0, got {self.optim.non_projection_lr_scale}"
                             " (--non-projection-lr-scale)")
        if self.optim.lora_lr_scope not in LORA_LR_SCOPES:
            raise ValueError(f"lora_lr_scope must be one of {', '.join(LORA_LR_SCOPES)}, got {self.optim.lora_lr_scope!r}"
                             " (--lora-lr-scope)")

    def engine_options(self):
        """The options of the engine this run uses (its section), or None."""
        section = backend_class(self.train.backend).options_section
        return getattr(self, section) if section else None

    def to_dict(self) -> dict:
        return {name: _plain(asdict(getattr(self, name))) for name in self.sections}

    @classmethod
    def from_dict(cls, tree: dict) -> "RunConfig":
        specs = section_specs()
        tree = {name: dict(values or {}) for name, values in tree.items()}
        for (old_section, old_key), (section, key) in MOVED_KEYS.items():
            if old_key in tree.get(old_section, {}):
                value = tree[old_section].pop(old_key)
                if key in tree.get(section, {}) and tree[section][key] != value:
                    raise ValueError(f"config sets both {old_section}.{old_key} and {section}.{key}; keep {section}.{key}")
                tree.setdefault(section, {})[key] = value
        extra = set(tree) - set(specs)
        if extra:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(extra))}; expected {', '.join(specs)}")
        parts = {}
        for name, (section_cls, defaults) in specs.items():
            values = tree.get(name, {})
            unknown = set(values) - {f.name for f in fields(section_cls)}
            if unknown:
                raise ValueError(f"unknown key(s) in config section '{name}': {', '.join(sorted(unknown))}")
            parts[name] = section_cls(**(asdict(section_cls(**defaults)) | values))
        return cls(**parts)


def standalone_method(name: str, *, steps: int = 1000, **settings):
    """Method `name` outside a run (benchmarks, the performance model): relora-train's defaults, with `settings`
    applied to its config section where that section has them (rank, dropout, ...). Benchmarks measure its last
    phase (`phases()[-1]`)."""
    cls = method_class(name)
    section = {}
    if cls.config_section is not None:
        known = {f.name for f in fields(cls.config_class)}
        section = {k: v for k, v in settings.items() if k in known}
    tree = {"train": {"method": name, "steps": steps}} | ({cls.config_section: section} if section else {})
    return cls(RunConfig.from_dict(tree))


def _datasets(dataset: str | None) -> list[str | None]:
    """The datasets --dataset names: one, or a mixture's components (malformed mixtures: one line)."""
    mixture = parse_mixture(dataset)
    return [dataset] if mixture is None else [c.spec for c in mixture]


def _plain(values: dict) -> dict:
    """YAML-friendly values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# (section, field) -> flag name; None = no flag. Fields not listed get --field-name in the core sections and
# the relora section (their historical flags), --section-field-name in the others.
FLAG_NAMES = {
    ("model", "preset"): "model",
    ("model", "config_path"): "model-config",
    ("model", "vocab_size"): "model-vocab-size",
    ("relora", "alpha"): "lora-alpha",
    ("relora", "dropout"): "lora-dropout",
    ("relora", "dropout_mask"): "lora-dropout-mask",
    ("deepspeed", "config"): "deepspeed",
    ("fsdp2", "reshard_after_forward"): "fsdp-reshard-after-forward",
    ("galore", "limiter"): "fira-limiter",
}
BARE_FLAG_SECTIONS = ("model", "data", "optim", "train", "relora")
# Fields every method section may have, set by one flag for the method in use (--rank: the rank of every
# low-rank method).
SHARED_METHOD_FIELDS = ("rank",)


def flag_for(section: str, name: str) -> str | None:
    if (section, name) in FLAG_NAMES:
        return FLAG_NAMES[section, name]
    if name == "seed" and section in method_sections():
        return None  # derived from --seed
    if name in SHARED_METHOD_FIELDS and section in method_sections():
        return name.replace("_", "-")
    flag = name.replace("_", "-")
    return flag if section in BARE_FLAG_SECTIONS else f"{section.replace('_', '-')}-{flag}"


def option_flag(section: str, name: str) -> str:
    flag = flag_for(section, name)
    return f"--{flag}" if flag else f"{section}.{name}"


def save_yaml(cfg: RunConfig, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
