"""The Method interface every training method implements, and the registry the CLI, the loop and the
benchmarks take their method list from.

A method decides what the model looks like (module surgery or another architecture, before an engine
wraps it), what trains and with which optimizer, the learning rate of every update, and what happens
between updates (events: merges, re-inits, state pruning, switches, subspace refreshes). Events act on
the model only through the neutral access layer (`relora_dist.access`). The training loop calls these
methods and never names a method; engines never see one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..access import TensorAccess
from ..models import build_model
from ..perf.accounting import FULL_RANK, CostTraits
from .lr_schedule import jagged_cosine


@dataclass(frozen=True)
class Event:
    """Something a method does after an update."""

    name: str
    """Short name ('wrap', 'merge', 'reset', ...): the loop logs its time as `<name>_s` in metrics.jsonl."""
    index: int = 0
    """How many events of this kind so far, this one included (keys their random draws)."""
    rebuild: bool = False
    """The model changes structure: the loop releases it from the engine, calls `prepare_model` for the next
    update and sets the engine up again with a fresh optimizer. Otherwise the loop calls `apply`."""
    routine: bool = False
    """Happens at (nearly) every update (SwitchLoRA's switch): timed as `<name>_s` like any event, but not logged line
    by line nor listed in the record's `events` (what relora-plot marks); the method's `log_fields` report it."""


class Method:
    """One training method. Subclasses set `name` and override what they change; the defaults train the model
    as built, all trainable parameters in one AdamW group, on a warm-up + cosine schedule, with no events.

    `cfg` is the run's `relora_dist.train.config.RunConfig`. `step` arguments count successful optimizer updates
    (a skipped non-finite update is not one), so events and LR restarts stay aligned whatever is skipped.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_section: ClassVar[str | None] = None
    """The run-config section holding this method's knobs (methods of one family may share one)."""
    config_class: ClassVar[type | None] = None
    """The dataclass of that section (validated on construction: `__post_init__` raises ValueError)."""
    config_defaults: ClassVar[dict] = {}
    """relora-train's defaults for that section where they differ from the dataclass's own."""
    engines: ClassVar[tuple[str, ...] | None] = None
    """Engines this method supports (None: every engine); checked while the config is validated."""
    cost_traits: ClassVar[CostTraits] = FULL_RANK
    """How relora_dist.perf counts its parameters, FLOPs, bytes and activations (MFU/HFU, the memory and throughput
    harnesses' expectations, the performance model): the costs the method causes (frozen W, low-rank factors,
    projected optimizer state, recomputation, ...), never its name. Default: every weight trains. A method whose
    traits depend on its settings sets the instance attribute in `__init__`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.total_steps = cfg.train.steps

    @property
    def settings(self):
        """This method's config section (None when it has none)."""
        return getattr(self.cfg, self.config_section) if self.config_section else None

    # -- validation (before any data is built or rank starts work) ---------------------------------------
    def validate(self) -> None:
        """Reject settings this method cannot run with (one-line ValueError naming the flag)."""
        warmup = self.cfg.optim.warmup_steps
        start, end = self.phases()[-1]  # the warm-up restarts with the last phase's schedule
        if not 0 <= warmup <= end - start:
            raise ValueError(f"warmup_steps {warmup} must be in [0, {end - start}] (--warmup-steps)")
        if self.engines is not None and self.cfg.train.backend not in self.engines:
            raise ValueError(f"--method {self.name} does not support --backend {self.cfg.train.backend}"
                             f" (supported: {', '.join(self.engines)})")

    def check_optimizer_layout(self, layout: str) -> None:
        """Reject an engine whose optimizer steps tensors this method's optimizer cannot use (`layout` is one of
        `access.OPTIMIZER_LAYOUTS`: whole parameters, row shards, flat partitions). Default: any."""

    def phases(self) -> list[tuple[int, int]]:
        """[start, end) update ranges with one model structure each; a rebuild event ends each but the last."""
        return [(0, self.total_steps)]

    # -- the model ------------------------------------------------------------------------------------
    def model_config(self, config):
        """The config to build for a base LLaMA config (another size, another architecture's config)."""
        return config

    def resolved_rank(self, config) -> int | None:
        """The rank this method trains `config` at (its --rank, or the default it derives from the model; None for
        full-rank methods): what the performance model counts."""
        return getattr(config, "rank", None) or getattr(self.settings, "rank", None)

    def build_model(self, config) -> nn.Module:
        """A freshly initialised model of `config` (another architecture overrides this; the global RNG is seeded)."""
        return build_model(config)

    def prepare_model(self, model: nn.Module, step: int) -> nn.Module:
        """The model for the updates from `step` on, transformed in place before an engine wraps it (module
        surgery). Called at the start (step 0, or the update a resumed run continues from) and after every
        rebuild event."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer param groups of what trains (groups carry a `name`; engines keep them apart)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "full_rank"}]

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The optimizer over `groups` (engines build it themselves from this callable). Plain AdamW here; a
        method may return a wrapper."""
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    def lr(self, step: int) -> float:
        """Learning rate of update `step` (0-based): the headline one, logged as `lr`."""
        o = self.cfg.optim
        return o.lr * jagged_cosine(step, total_steps=self.total_steps, first_warmup=o.warmup_steps,
                                    min_lr_ratio=o.min_lr_ratio)

    def group_lr(self, step: int, group: str) -> float:
        """Learning rate of update `step` for the param group named `group` (see `param_groups`); every group
        takes `lr(step)` unless a method gives its groups different rates."""
        return self.lr(step)

    # -- events ---------------------------------------------------------------------------------------
    def after_update(self, step: int) -> list[Event]:
        """Events to perform now that `step` updates are done (called once per successful update)."""
        return []

    def apply(self, event: Event, model: nn.Module, access: TensorAccess) -> str:
        """Perform a non-rebuild event on `model` (unwrapped) through `access`; returns a log line."""
        raise NotImplementedError(f"{self.name} has no event {event.name!r}")

    def describe_rebuild(self, event: Event, model: nn.Module) -> str:
        """The log line after a rebuild event (the model as rebuilt)."""
        return f"{event.name}: model rebuilt"

    def log_fields(self, step: int) -> dict:
        """Values added to every metrics.jsonl record and to summary.json after `step` updates."""
        return {}

    def periodic_events(self) -> list[tuple[Event, int]]:
        """(event, period in updates) of the recurring events of the last phase, for the throughput benchmark."""
        return []

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State beyond the model and optimizer, the same on every rank: tensors and primitives only (loadable
        with weights_only=True and through torch.distributed.checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state, but the checkpoint holds {sorted(state)}")

    # -- export ---------------------------------------------------------------------------------------
    def dense_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain model's state dict (what `model_config` builds, without method modules) from a trained one."""
        return state


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as --method `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)} (--method)")
    return _REGISTRY[name]


def method_sections() -> dict[str, tuple[type, dict]]:
    """Config section -> (its dataclass, relora-train's defaults), for every registered method that has one."""
    out = {}
    for cls in _REGISTRY.values():
        if cls.config_section is None:
            continue
        spec = (cls.config_class, dict(cls.config_defaults))
        if out.setdefault(cls.config_section, spec) != spec:
            raise ValueError(f"methods sharing the config section '{cls.config_section}' disagree on its class or defaults")
    return out


def build_method(cfg) -> Method:
    """The method `cfg.train.method` names, for the run config `cfg`."""
    return method_class(cfg.train.method)(cfg)

