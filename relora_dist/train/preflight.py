"""Everything a run would reject that is known before its data: checked on every rank before any data is
built or any collective starts, and by --dry-run (a few seconds, no data, no process group)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends import backend_class
from ..backends.base import NoOptions
from ..data import DataSpec, check_data_spec, split_batch
from ..data.pipeline import default_cache_dir
from ..methods import Method, build_method
from .build import run_model_config
from .compile import check_compile
from .config import RunConfig


@dataclass
class RunPlan:
    method: Method
    world_size: int
    accumulation_steps: int


def launcher_world_size() -> int:
    """Ranks this job runs on, as the launcher (torchrun, deepspeed) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg: RunConfig, world_size: int | None = None) -> RunPlan:
    """Validate the config, the method (its phases against the steps, its engines), the batch split, the engine
    options (DeepSpeed's JSON) and the model the method builds (on the meta device: rank against layer widths,
    target modules, sequence length). One-line ValueErrors naming the flag."""
    world_size = launcher_world_size() if world_size is None else world_size
    cfg.validate()
    method = build_method(cfg)
    method.validate()
    t = cfg.train
    accumulation = split_batch(t.global_batch_size, world_size=world_size, micro_batch_size=t.micro_batch_size)
    engine, options = backend_class(t.backend), cfg.engine_options() or NoOptions()
    engine.check_options(options, dtype=t.dtype, micro_batch_size=t.micro_batch_size, accumulation_steps=accumulation,
                         world_size=world_size, max_norm=cfg.optim.grad_clip)
    method.check_optimizer_layout(engine.optimizer_layout(options, dtype=t.dtype))
    if t.compile:
        check_compile(t.compile_backend, cuda=torch.cuda.is_available())
    check_model(cfg, method)
    check_data_spec(data_spec(cfg))
    return RunPlan(method, world_size, accumulation)


def data_spec(cfg: RunConfig) -> DataSpec:
    d = cfg.data
    return DataSpec(d.dataset, d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction, text_field=d.text_field,
                    cache_dir=Path(d.cache_dir) if d.cache_dir else default_cache_dir())


def check_model(cfg: RunConfig, method: Method) -> None:
    """Build the model of every phase on the meta device (no memory, no init cost): shape errors show now. The
    vocabulary is --vocab-size's stand-in (the tokenizer is not built yet); no check depends on it."""
    m = cfg.model
    config = run_model_config(method, m.preset, vocab_size=cfg.data.vocab_size, config_path=m.config_path,
                              max_positions=m.max_positions)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.data.seq_len} exceeds the model's max positions"
                         f" {config.max_position_embeddings} (--seq-len)")
    with torch.random.fork_rng(devices=[]):
        for start, _ in method.phases():
            with torch.device("meta"):
                model = method.build_model(config)
            method.prepare_model(model, start)
