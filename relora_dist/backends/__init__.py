"""Engine registry: name -> Backend class, one module per engine.

Engine modules import their engine (deepspeed, fairscale) only when a backend is set up, so the registry
itself is cheap and optional engines stay optional.
"""

from __future__ import annotations

import importlib
from dataclasses import fields

import torch

from .base import Backend

# name -> "module:Class", imported on first use
_REGISTRY = {
    "ddp": f"{__name__}.ddp:DDPBackend",
    "deepspeed": f"{__name__}.deepspeed.backend:DeepSpeedBackend",
    "fsdp2": f"{__name__}.fsdp2:FSDP2Backend",
    "fairscale": f"{__name__}.fairscale:FairscaleBackend",
    "zero_redundancy": f"{__name__}.zero_redundancy:ZeroRedundancyBackend",
}
BACKENDS = tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (--backend)")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def option_sections() -> dict[str, type]:
    """Config section name -> options dataclass, for every engine that has options (engines may share one)."""
    out = {}
    for name in BACKENDS:
        cls = backend_class(name)
        if cls.options_section is not None:
            out.setdefault(cls.options_section, cls.Options)
    return out


def build_backend(name: str, *, device: torch.device, dtype: str, micro_batch_size: int = 1, accumulation_steps: int = 1,
                  max_norm: float = 1.0, **options) -> Backend:
    """The engine `name` for this run. `options` are the engine's own (the fields of its `Options`: DeepSpeed's
    config, FSDP2's reshard_after_forward, DDP's harness switches); an unknown one is an error."""
    cls = backend_class(name)
    known = {f.name for f in fields(cls.Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for --backend {name}: {', '.join(unknown)}"
                         f" (it takes {', '.join(sorted(known)) or 'none'})")
    return cls(device=device, dtype=dtype, micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps,
               max_norm=max_norm, **options)


def adopt_engine(wrapped, optimizer, *, dtype: str = "fp32", fp32_values=None) -> Backend:
    """The registered engine that built `wrapped` (a model another framework wrapped: Hugging Face Trainer through
    accelerate), adopted around it and `optimizer` (`Backend.adopt`). A wrapper no engine recognises is a one-line
    ValueError."""
    engines = sorted((backend_class(name) for name in BACKENDS), key=lambda engine: engine.adopts_bare_modules)
    for engine in engines:  # the engine that takes a bare module (one process) only after every wrapper's own
        backend = engine.adopt(wrapped, optimizer, dtype=dtype, fp32_values=fp32_values)
        if backend is not None:
            return backend
    raise ValueError(f"relora_dist reaches the tensors of {', '.join(BACKENDS)} engines; the model was wrapped in"
                     f" {type(wrapped).__name__}, which none of them recognises")


__all__ = ["Backend", "BACKENDS", "adopt_engine", "backend_class", "build_backend", "option_sections"]
