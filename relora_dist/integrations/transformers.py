"""Every relora_dist method inside Hugging Face `Trainer`, on the engine Trainer's accelerator builds: DDP (or one
process), DeepSpeed ZeRO 0-3 from `TrainingArguments(deepspeed=...)`, FSDP2 from `fsdp_config={"fsdp_version": 2}`.

    trainer = MethodTrainer(model=model, args=args, train_dataset=data, method="relora",
                            method_settings={"rank": 128, "merge_every": 1000})
    trainer.train()
    trainer.save_merged("out/merged")  # AutoModelForCausalLM.from_pretrained loads it

What the method owns and Trainer does not: the model's structure (prepared before Trainer wraps it), the param groups
and the optimizer (`create_optimizer`), the LR of every group (`MethodSchedule`, stepped by Trainer as its scheduler),
and its events after every optimizer update (`on_step_end`, never on a micro-step), which act through the access layer
of whatever engine Trainer built (`backends.adopt_engine`). Its state goes into Trainer's checkpoints, so
`resume_from_checkpoint` continues exactly; its log fields go into Trainer's logs (TensorBoard, W&B).

Tested with transformers 5.25 and accelerate 1.15 (`pip install relora-dist[hf]`). What Trainer cannot run exactly is
refused at construction in one line: a warm start that rebuilds the model mid-run, Trainer's own optimizer or schedule
choices (`optim`, layer-wise optimizers, `lr_scheduler_type`, a DeepSpeed config's `optimizer`/`scheduler`), fp16,
FSDP1, an unbounded run (no `max_steps`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import PretrainedConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..access import fp32_frozen_parameters
from ..backends import adopt_engine, backend_class
from ..backends.base import scaled_rate
from ..methods import method_class
from ..models import save_hf_model
from ..train.build import method_param_groups
from ..train.checkpoint import load_method_state, save_method_state
from ..train.config import RunConfig

logger = logging.getLogger("relora_dist")

METHOD_FILE = "relora_method.json"  # beside Trainer's files in each checkpoint: which method wrote it, its settings
# optim: settings a method reads that TrainingArguments has no field for (the rest come from TrainingArguments)
OPTIM_SETTINGS = ("lora_lr", "lora_lr_scope", "non_projection_lr_scale", "min_lr_ratio")
TRAINER_ADAMW = ("adamw_torch", "adamw_torch_fused")  # Trainer's defaults: the method's optimizer takes their place


def trainer_engine(args: TrainingArguments) -> str:
    """The registered engine Trainer builds for `args`: DeepSpeed, FSDP2, or DDP (one process included)."""
    if args.deepspeed:
        return "deepspeed"
    return "fsdp2" if args.fsdp_plugin_args is not None else "ddp"


def run_config(method: str, args: TrainingArguments, settings: dict | None = None) -> RunConfig:
    """The run config a method reads, from Trainer's arguments (steps, seed, precision, AdamW, clipping, warm-up) and
    `settings`: fields of the method's config section (`rank`, `merge_every`, ...) and the optimizer settings
    TrainingArguments lacks (`OPTIM_SETTINGS`). One-line ValueErrors for what cannot run."""
    cls = method_class(method)
    settings = dict(settings or {})
    section = cls.config_section
    own = {f.name for f in fields(cls.config_class)} if section else set()
    unknown = sorted(set(settings) - own - set(OPTIM_SETTINGS))
    if unknown:
        raise ValueError(f"method_settings {', '.join(unknown)} unknown to --method {method} (it takes"
                         f" {', '.join(sorted(own | set(OPTIM_SETTINGS)))})")
    if args.max_steps <= 0:
        raise ValueError("set TrainingArguments(max_steps=N): the method's schedule and events count optimizer updates")
    if args.fp16:
        raise ValueError("fp16 is not supported by relora_dist's methods: use bf16=True or fp32")
    tree = {
        "train": {"method": method, "steps": args.max_steps, "seed": args.seed, "backend": trainer_engine(args),
                  "dtype": "bf16" if args.bf16 else "fp32"},
        "optim": {"lr": args.learning_rate, "beta1": args.adam_beta1, "beta2": args.adam_beta2, "eps": args.adam_epsilon,
                  "weight_decay": args.weight_decay, "grad_clip": args.max_grad_norm,
                  "warmup_steps": args.get_warmup_steps(args.max_steps),
                  **{k: v for k, v in settings.items() if k in OPTIM_SETTINGS}},
    }
    if section:
        tree[section] = {k: v for k, v in settings.items() if k in own}
    cfg = RunConfig.from_dict(tree)
    cfg.validate()
    return cfg


def check_trainer_arguments(args: TrainingArguments, optimizers=(None, None)) -> None:
    """Trainer options that would replace what the method decides, refused in one line naming what works."""
    default = TrainingArguments.__dataclass_fields__
    if any(o is not None for o in optimizers):
        raise ValueError("MethodTrainer builds the method's optimizer and schedule: pass no optimizers=")
    optim = getattr(args.optim, "value", args.optim)
    if optim not in TRAINER_ADAMW or args.optim_target_modules is not None:
        raise ValueError(f"optim={optim} would replace the method's optimizer (layer-wise ones would also step inside"
                         f" backward); leave optim at its default: GaLore and the others are methods (method='galore')")
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if schedule != default["lr_scheduler_type"].default:
        raise ValueError(f"lr_scheduler_type={schedule}: the method's own schedule drives the LR; leave"
                         " lr_scheduler_type at its default (warm-up: warmup_steps, floor: method_settings min_lr_ratio)")
    if args.deepspeed:
        config = args.hf_deepspeed_config.config
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise ValueError(f"the DeepSpeed config has a '{section}' section, which would replace the method's"
                                 f" {section}: remove it (the method supplies both through Trainer)")
    if args.fsdp_plugin_args is not None and int(args.fsdp_plugin_args.get("fsdp_version", 1)) != 2:
        raise ValueError("FSDP1 is not supported: fsdp_config={'fsdp_version': 2} (FSDP2, fully_shard)")


def check_layout(method_obj, args: TrainingArguments) -> None:
    """The method's optimizer against the tensors the engine hands it (whole, row shards, flat partitions)."""
    engine = backend_class(trainer_engine(args))
    options = engine.Options(**({engine.implied_by: args.hf_deepspeed_config.config} if args.deepspeed else {}))
    method_obj.check_optimizer_layout(engine.optimizer_layout(options, dtype=method_obj.cfg.train.dtype))


class MethodSchedule(LRScheduler):
    """The method's LR for every param group (its restarts, its per-group rates), as Trainer steps a scheduler: the
    rate of update k (0-based) is `group_lr(k, group name)` times the group's `lr_scale`."""

    def __init__(self, optimizer, method, last_epoch: int = -1):
        self.method = method
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        step = max(self.last_epoch, 0)
        return [scaled_rate(group, self.method.group_lr(step, group["name"])) for group in self.optimizer.param_groups]

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "method"}  # plain data: weights_only loads it


class _MethodEvents(TrainerCallback):
    """Trainer's hooks after an optimizer update and after a checkpoint, handed to the trainer that owns the method."""

    def __init__(self, trainer: "MethodTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.adopt_engine()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.after_update(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_method_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class MethodTrainer(Trainer):
    """`Trainer` training `method` (a relora_dist --method name) with `method_settings` (its config section's fields,
    e.g. rank, merge_every; see the README's config reference). `model` is a LLaMA-like causal LM to prepare, or a
    config to build the method's model from (CoLA and CR-Net build their own architecture; seeded with args.seed).

    `cpu_fsdp2=True` lifts accelerate's one device gate for FSDP on a CPU (tests and examples on gloo ranks); without
    it, FSDP2 asked for on a CPU is refused in one line instead of silently running DDP."""

    def __init__(self, model=None, args: TrainingArguments = None, *, method: str, method_settings: dict | None = None,
                 cpu_fsdp2: bool = False, **kwargs):
        if args is None:
            raise ValueError("MethodTrainer needs TrainingArguments (max_steps, learning_rate, ...)")
        check_trainer_arguments(args, kwargs.get("optimizers", (None, None)))
        self.method_name = method
        self.method = method_class(method)(run_config(method, args, method_settings))
        self.method.validate()
        if len(self.method.phases()) > 1:
            raise ValueError(f"--method {method} with these settings rebuilds the model mid-run (a warm start), which"
                             " Trainer's engine cannot do: set its warm_start_steps to 0, or warm-start in a Trainer run of its own")
        check_layout(self.method, args)
        self.cpu_fsdp2 = cpu_fsdp2
        model = self._prepared_model(model, args.seed)
        self.model_config = model.config
        # bf16 engines cast what the method writes in place: its exact values now (access.fp32_frozen_parameters)
        self.fp32_values = ({name: p.detach().float().clone() for name, p in fp32_frozen_parameters(model)}
                            if args.bf16 else {})
        self.engine = None  # the adopted engine, once Trainer's accelerator has wrapped the model
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_MethodEvents(self)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

    def _prepared_model(self, model, seed: int):
        if isinstance(model, PretrainedConfig):
            torch.manual_seed(seed)  # the same initial model on every rank and world size
            model = self.method.build_model(self.method.model_config(model))
        elif model is None:
            raise ValueError("MethodTrainer needs model= (a causal LM, or a config to build the method's model from)")
        elif self.method.model_config(model.config).to_dict() != model.config.to_dict():
            raise ValueError(f"--method {self.method_name} trains a model of its own (another architecture or size):"
                             f" pass the base config (model=config) and MethodTrainer builds it")
        return self.method.prepare_model(model, 0)

    # -- engine -------------------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            state = self.accelerator.state
            if not (self.cpu_fsdp2 and state.device.type == "cpu"):
                raise ValueError(f"FSDP2 was asked for, but accelerate built {state.distributed_type.value} instead"
                                 " (it enables FSDP on accelerators only); on a CPU pass MethodTrainer(cpu_fsdp2=True)")
            enable_cpu_fsdp(state, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = method_param_groups(self.method, self.model if model is None else model)
            self.optimizer = self.method.make_optimizer(groups)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = MethodSchedule(optimizer or self.optimizer, self.method)
            self._created_lr_scheduler = True
        if self.is_deepspeed_enabled:  # wrapped just now: adopted before a checkpoint load needs the optimizer's hooks
            self.adopt_engine()
        return self.lr_scheduler

    def adopt_engine(self):
        """The engine Trainer's accelerator built, adopted for the method's events (once per wrapping)."""
        wrapped = self._wrapped_model()
        if self.engine is not None and self.engine.model is wrapped:
            return self.engine
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.engine = adopt_engine(wrapped, optimizer, dtype=self.method.cfg.train.dtype, fp32_values=self.fp32_values)
        if self.is_world_process_zero():
            logger.info("%s: %s on %s (%d ranks)", self.method_name, type(wrapped).__name__, self.engine.name,
                        self.engine.world_size)
        return self.engine

    def _wrapped_model(self):
        """DeepSpeed's engine as soon as accelerate built it; otherwise what Trainer keeps as `model_wrapped` (DDP, the
        fully_shard-ed model, or the model itself in one process), set once it prepared the model."""
        deepspeed = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        return deepspeed.engine if deepspeed is not None else self.model_wrapped

    # -- events, logs ---------------------------------------------------------------------------------------
    def after_update(self, step: int) -> None:
        """The method's events after optimizer update `step` (1-based), through the engine's access layer."""
        for event in self.method.after_update(step):
            if event.rebuild:
                raise RuntimeError(f"{self.method_name}: a rebuild event under Trainer ({event.name}, update {step})")
            message = self.method.apply(event, self.engine.unwrapped_model, self.engine.shard_access())
            if not event.routine and self.is_world_process_zero():
                logger.info("update %d: %s", step, message)

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:  # training records: the method's fields beside Trainer's
            logs = {**logs, **self.method.log_fields(self.state.global_step)}
        return super().log(logs, *args, **kwargs)

    # -- checkpoints, export ------------------------------------------------------------------------------
    def save_method_checkpoint(self, directory: Path) -> None:
        """Beside Trainer's checkpoint in `directory`: the method's state and settings (rank 0) and what the engine
        keeps outside the framework's files (the fp32 copies of a bf16 engine)."""
        if self.is_world_process_zero():
            save_method_state(directory, self.method.state_dict())
            (directory / METHOD_FILE).write_text(json.dumps(self._method_record(), indent=1))
        self.engine.save_adopted(directory)

    def _method_record(self) -> dict:
        return {"method": self.method_name, "settings": asdict(self.method.settings) if self.method.settings else {}}

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        directory = Path(checkpoint)
        record = directory / METHOD_FILE
        if not record.is_file():
            raise ValueError(f"checkpoint {directory} has no {METHOD_FILE}: not written by MethodTrainer")
        saved, this = json.loads(record.read_text()), json.loads(json.dumps(self._method_record()))
        if saved["method"] != this["method"]:
            raise ValueError(f"checkpoint {directory} was written by --method {saved['method']}; this run: {this['method']}")
        changed = sorted(k for k in saved["settings"].keys() | this["settings"].keys()
                         if saved["settings"].get(k) != this["settings"].get(k))
        if changed:
            raise ValueError(f"checkpoint {directory} was written with other {this['method']} settings: " + ", ".join(
                f"{k} {saved['settings'].get(k)!r} there, {this['settings'].get(k)!r} here" for k in changed))
        self.method.load_state_dict(load_method_state(directory))
        self.adopt_engine().load_adopted(directory)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's train; a checkpoint to resume from has the files its engine unpickles itself checked as data
        first (DeepSpeed's: a planted pickle is refused in one line before DeepSpeed reads it)."""
        if resume_from_checkpoint:
            path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path:
                backend_class(trainer_engine(self.args)).check_adopted_checkpoint(Path(path))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_merged(self, directory: str | Path) -> Path:
        """The plain model (ReLoRA's s*B@A folded into W, ...) as safetensors with its config and the tokenizer
        (`processing_class`): what `AutoModelForCausalLM.from_pretrained` loads. Every rank calls it."""
        state = self.adopt_engine().model_state_for_export()
        if self.is_world_process_zero():
            save_hf_model(self.method.dense_state(state), self.model_config, self.processing_class, directory)
            logger.info("merged model written to %s", directory)
        self.accelerator.wait_for_everyone()
        return Path(directory)


def enable_cpu_fsdp(state, plugin_args: dict) -> None:
    """accelerate 1.15 turns FSDP on only in its accelerator branches of `AcceleratorState` and silently runs DDP on a
    CPU; this turns it on for a CPU state the way those branches do (the distributed type, the plugin, its mixed
    precision). FSDP2 itself stays real: accelerate's fully_shard over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
