"""The build sequence every run and every harness shares: model_config -> build_model -> prepare_model -> compile ->
engine setup. The trainer runs it at start (and its pieces at a rebuild); relora-bench runs it for each case, so a
benchmark measures the model and engine a run trains."""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from ..models import LLAMA_PROJECTIONS, llama_config
from .compile import compile_decoder_layers


def run_model_config(method, preset: str | None, *, vocab_size: int, max_positions: int, config_path: str | None = None):
    """The model config `method` trains: its own (CoLA, CR-Net) or HF LLaMA's, from a preset or a config file."""
    return method.model_config(llama_config(preset, vocab_size=vocab_size, config_path=config_path,
                                            max_positions=max_positions))


def build_method_model(method, config, step: int, *, activation_checkpointing: bool = False) -> nn.Module:
    """The model as `method` structures it for update `step` (0-based), before an engine wraps it."""
    model = method.build_model(config)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return method.prepare_model(model, step)


def set_up_engine(backend, method, model: nn.Module, *, compile: bool = False, compile_backend: str = "inductor") -> list[str]:
    """Hand the model, in its final structure for this phase, to the engine (compiled first with --compile: FSDP2 needs
    compile before fully_shard). Returns the param group names."""
    if compile:
        compile_decoder_layers(model, compile_backend)
    groups = method_param_groups(method, model)
    backend.setup(model, method.make_optimizer, groups)
    return [g["name"] for g in groups]


def method_param_groups(method, model: nn.Module) -> list[dict]:
    """The optimizer's param groups for `method` on `model`: the method's own, with --non-projection-lr-scale applied."""
    return scale_non_projection_lr(method.param_groups(model), model, method.cfg.optim.non_projection_lr_scale)


def scale_non_projection_lr(groups: list[dict], model: nn.Module, scale: float) -> list[dict]:
    """--non-projection-lr-scale: each param group split into the parameters inside the attention and MLP projections
    and the others (embeddings, head, norms), which get `lr_scale` (the engines multiply the group's rate by it).
    The groups as they are when `scale` is 1."""
    if scale == 1.0:
        return groups
    inside = {id(p) for name, p in model.named_parameters() if set(name.split(".")) & set(LLAMA_PROJECTIONS)}
    out = []
    for group in groups:
        outside = [p for p in group["params"] if id(p) not in inside]
        projections = [p for p in group["params"] if id(p) in inside]
        if projections:
            out.append({**group, "params": projections})
        if outside:
            out.append({**group, "params": outside, "lr_scale": scale})
    return out


def build_and_set_up(method, config, step: int, make_backend: Callable[[], object], *, activation_checkpointing: bool = False,
                     compile: bool = False, compile_backend: str = "inductor", timings: dict | None = None):
    """The whole sequence for update `step`: (the engine, set up with the model; the model; its param group names). The engine
    is made after the model is built, so that building it draws nothing from the model's random stream; `timings`
    gets `model_s` and `engine_s`."""
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    model = build_method_model(method, config, step, activation_checkpointing=activation_checkpointing)
    timings["model_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    backend = make_backend()
    group_names = set_up_engine(backend, method, model, compile=compile, compile_backend=compile_backend)
    timings["engine_s"] = time.perf_counter() - clock
    return backend, model, group_names
