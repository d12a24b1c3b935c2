"""The training loop: one code path for every method and engine; it names neither.

Per optimizer update: micro-batches (no gradient sync off the boundary) -> clip -> finite check (same
decision on every rank) -> step -> the method's events (rebuilds through the engine, the rest through the
access layer) -> eval -> checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..backends import build_backend
from ..data import RunData, open_run_data, val_batches
from ..data.loader import BatchLoader
from ..distributed import init_distributed, rank0_first
from ..host_memory import keep_freed_memory
from ..methods import Event
from ..metrics import Utilization, build_reporters, device_peak_flops, memory_fields, reporter_names, throughput_fields
from ..metrics.writer import MetricsWriter, write_summary
from ..models import causal_lm_loss, save_hf_model
from .checkpoint import (check_model_fits, claim_run_directory, load_method_state, load_rng, read_trainer_state,
                         resolve_checkpoint, save_checkpoint, save_method_state)
from .build import build_and_set_up, build_method_model, run_model_config, set_up_engine
from .compile import compiled_graphs
from .config import RunConfig, save_yaml
from .consistency import check_replicas
from .faults import FaultPlan
from .preflight import data_spec, preflight

logger = logging.getLogger("relora_dist")


def build_run_data(cfg: RunConfig, *, verify: bool = True, progress: bool = True) -> RunData:
    """The run's stores (prepared into the cache first where --dataset names raw text), tokenizer and sampler."""
    t = cfg.train
    return open_run_data(data_spec(cfg), seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size, seed=t.seed,
                         verify=verify, progress=progress)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.train
        plan = preflight(cfg)  # every config error, before any data or collective
        self.method = plan.method
        self.dist = init_distributed(timeout_s=t.dist_timeout_s)
        if t.keep_host_memory and self.dist.device.type == "cpu":  # before data and model allocate anything
            allocator = keep_freed_memory()
            if self.dist.rank == 0:
                logger.info("host memory: %s", allocator)
        self.faults = FaultPlan.from_env(self.dist.rank)
        self.graphs_before = compiled_graphs()  # the columns count this run's graphs, not an earlier run's in this process
        self.out = Path(t.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; the run directory must be a folder")
        self.is_main = self.dist.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        resume_dir = resolve_checkpoint(t.resume, self.out) if t.resume else None
        saved = read_trainer_state(resume_dir) if resume_dir is not None else None
        if saved is not None:
            for key in ("method", "backend"):
                if saved.get(key) != getattr(t, key):
                    raise ValueError(f"--resume: {resume_dir} was written with {key} {saved.get(key)!r}, this run uses {getattr(t, key)!r}")

        # Rank 0 prepares what is missing (a raw --dataset into its store) and verifies the checksums; the other ranks
        # then open the same stores.
        clock = time.perf_counter()
        self.data = rank0_first(lambda: build_run_data(cfg, verify=self.is_main, progress=t.progress and self.is_main),
                                rank=self.dist.rank, world_size=self.dist.world_size)
        self.startup = {"data_s": time.perf_counter() - clock}  # seconds of each setup stage (summary.json, benchmarks)
        self.accumulation_steps = plan.accumulation_steps  # the split preflight checked

        self._eval_sequences = self._eval_set_size(len(self.data.val))

        vocab = cfg.model.vocab_size or len(self.data.tokenizer)
        if vocab < self.data.vocab_size:
            raise ValueError(f"the data's vocabulary ({self.data.vocab_size} tokens, {self.data.source}) is larger than"
                             f" the model's embedding ({vocab} rows, --model-vocab-size)")
        self.model_config = run_model_config(self.method, cfg.model.preset, vocab_size=vocab, config_path=cfg.model.config_path,
                                             max_positions=cfg.model.max_positions)
        self.utilization = Utilization(self.model_config, seq_len=cfg.data.seq_len, cost_traits=self.method.cost_traits,
                                       rank=getattr(self.method.settings, "rank", 0), peak_flops=self._peak_flops())
        self.step = 0  # successful optimizer updates: the one counter the method's schedule and events follow
        self.batches_consumed = 0
        self.consecutive_skips = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.saved_step = None

        if resume_dir is not None:
            check_model_fits(resume_dir, self.model_config.to_dict())
            self.step = int(saved["controller"]["step"])
            self.method.load_state_dict(load_method_state(resume_dir))
        else:
            # --resume auto with nothing to resume: a restarted job that died before its first checkpoint
            overwrite = t.overwrite or t.resume == "auto"
            rank0_first(lambda: claim_run_directory(self.out, overwrite=overwrite, is_main=self.is_main),
                        rank=self.dist.rank, world_size=self.dist.world_size)

        torch.manual_seed(t.seed)  # identical init on every rank and world size
        self.backend, _, self.group_names = build_and_set_up(
            self.method, self.model_config, self.step,
            lambda: build_backend(t.backend, device=self.dist.device, dtype=t.dtype, micro_batch_size=t.micro_batch_size,
                                  accumulation_steps=self.accumulation_steps, max_norm=cfg.optim.grad_clip,
                                  **_options(cfg.engine_options())),
            activation_checkpointing=t.activation_checkpointing, compile=t.compile, compile_backend=t.compile_backend,
            timings=self.startup)
        # Dropout streams differ per rank (methods' own randomness never uses the global RNG).
        torch.manual_seed(t.seed * 1000 + 1 + self.dist.rank)
        if resume_dir is not None:
            self._resume(resume_dir, saved)
        if self.is_main:
            save_yaml(cfg, self.out / "config.yaml")
            logger.info("set up in %s", ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in self.startup.items()))

    def _peak_flops(self) -> float | None:
        """Per rank, for the mfu/hfu columns: --peak-tflops, else the device's (metrics.device_peak_flops)."""
        t = self.cfg.train
        return t.peak_tflops * 1e12 if t.peak_tflops else device_peak_flops(self.dist.device, t.dtype)[0]

    def _eval_set_size(self, available: int) -> int:
        """Whole global batches of validation sequences: independent of world size, and every rank runs the
        same number of forward passes (sharded engines communicate inside forward)."""
        t = self.cfg.train
        unit = t.global_batch_size if available >= t.global_batch_size else self.dist.world_size * t.micro_batch_size
        wanted = t.eval_batches * t.global_batch_size if t.eval_batches > 0 else available
        size = min(wanted, available) // unit * unit
        if size == 0:
            raise ValueError(f"validation split has {available} sequences, fewer than one per micro-batch on every rank"
                             f" ({unit}) (--val-fraction, --micro-batch-size)")
        return size

    # -- setup -----------------------------------------------------------------------------------
    def _build_model(self, step: int):
        return build_method_model(self.method, self.model_config, step,
                                  activation_checkpointing=self.cfg.train.activation_checkpointing)

    def _setup_backend(self, model) -> None:
        t = self.cfg.train
        self.group_names = set_up_engine(self.backend, self.method, model, compile=t.compile, compile_backend=t.compile_backend)

    def _resume(self, path: Path, state: dict) -> None:
        self.backend.load(path)
        self.batches_consumed = state["batches_consumed"]
        self.skipped_total = state.get("skipped_total", 0)
        self.elapsed_before = state.get("wall_s", 0.0)
        if (state["world_size"] != self.dist.world_size or not load_rng(path, self.dist.rank)) and self.is_main:
            logger.warning("checkpoint written by %d ranks, resumed on %d: dropout RNG streams restart from the seed",
                           state["world_size"], self.dist.world_size)
        if self.is_main:
            logger.info("resumed from %s at update %d", path, self.step)

    # -- one update ------------------------------------------------------------------------------
    def _lr(self) -> float:
        return self.method.lr(self.step)

    def _group_lrs(self) -> dict[str, float]:
        return {name: self.method.group_lr(self.step, name) for name in self.group_names}

    def _train_update(self) -> tuple[float, float, bool]:
        """Forward/backward over this rank's micro-batches, clip, step if finite. Returns (loss, grad_norm, stepped)."""
        backend = self.backend
        attempt = self.batches_consumed + 1
        self.faults.before_update(attempt)
        self.faults.desync(backend.unwrapped_model, attempt)
        index, micro = next(self.loader)
        assert index == self.batches_consumed, (index, self.batches_consumed)
        backend.model.train()
        loss_sum = torch.zeros((), device=self.dist.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with (contextlib.nullcontext() if sync else backend.no_sync()):
                with backend.forward_context():
                    loss = causal_lm_loss(backend.model, batch) / len(micro)
                if i == 0:
                    loss = self.faults.corrupt_loss(loss, attempt)
                backend.backward(loss)
            loss_sum += loss.detach().float()
        loss_mean = backend.all_reduce_sum(loss_sum) / self.dist.world_size
        grad_norm, stepped = backend.step(lr=self._group_lrs(), max_norm=self.cfg.optim.grad_clip,
                                          loss_is_finite=bool(torch.isfinite(loss_mean)))
        backend.zero_grad()
        self.batches_consumed += 1
        return float(loss_mean), grad_norm, stepped

    def _apply_events(self, events: list[Event], metrics: MetricsWriter) -> dict:
        """Perform the method's events after update `self.step`; returns their times (`<name>_s`)."""
        timing = {}
        for event in events:
            start = time.perf_counter()
            if event.rebuild:
                message = self._rebuild(event)
            else:
                message = self.method.apply(event, self.backend.unwrapped_model, self.backend.shard_access())
            timing[f"{event.name}_s"] = time.perf_counter() - start
            if not event.routine:
                metrics.event(f"update {self.step}: {message}", step=self.step)
        if self.cfg.train.check_replicas and any(not e.rebuild for e in events):
            check_replicas(self.backend.replicated_named_tensors() + self._method_tensors(), self.dist.device,
                           f"update {self.step}")
        return timing

    def _method_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The method's own state that is a tensor (random generators, counters): the same on every rank."""
        return [(f"method/{key}", value) for key, value in self.method.state_dict().items() if torch.is_tensor(value)]

    def _rebuild(self, event: Event) -> str:
        """Take the model back from the engine, let the method restructure it, set the engine up again (a new
        optimizer, as the reference does at the warm-start switch; --keep-states-at-switch carries the states
        of the parameters that keep training)."""
        model = self.backend.release_model(lambda: self._build_model(self.step - 1))
        kept = self.backend.param_states(model.parameters()) if self.cfg.optim.keep_states_at_switch else {}
        model = self.method.prepare_model(model, self.step)  # every Parameter object that stays is the same
        self._setup_backend(model)
        self.backend.restore_param_states({p: s for p, s in kept.items() if p.requires_grad})
        return self.method.describe_rebuild(event, model)

    # -- evaluation, checkpoints -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        model = self.backend.model
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for indices in val_batches(self._eval_sequences, rank=self.dist.rank, world_size=self.dist.world_size,
                                   batch_size=t.micro_batch_size):
            batch = self.data.val[indices].to(self.dist.device)
            with self.backend.forward_context():
                loss = causal_lm_loss(model, batch)
            tokens = batch.numel() - batch.shape[0]  # labels are shifted by one inside the model
            totals += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64, device=self.dist.device)
        model.train()
        self.backend.all_reduce_sum(totals)
        return float(totals[0] / totals[1])

    def _trainer_state(self, wall_s: float) -> dict:
        return {
            "controller": {"step": self.step}, "batches_consumed": self.batches_consumed,
            "skipped_total": self.skipped_total, "world_size": self.dist.world_size, "wall_s": wall_s,
            "backend": self.cfg.train.backend, "method": self.cfg.train.method,
        }

    def _write_extra(self, directory: Path) -> None:
        (directory / "model_config.json").write_text(json.dumps(self.model_config.to_dict(), indent=1))
        self.data.tokenizer.save_pretrained(directory / "tokenizer")
        save_yaml(self.cfg, directory / "config.yaml")
        save_method_state(directory, self.method.state_dict())

    def save(self, wall_s: float) -> Path:
        step = self.saved_step = self.step
        return save_checkpoint(self.out / "checkpoints", step, self.backend, self._trainer_state(wall_s),
                               self._write_extra, keep=self.cfg.train.keep_checkpoints,
                               written=lambda: self.faults.checkpoint_written(step))

    def export_merged(self, directory: str) -> None:
        state = self.backend.model_state_for_export()
        if self.is_main:
            save_hf_model(self.method.dense_state(state), self.model_config, self.data.tokenizer, directory)
            logger.info("merged HF model written to %s", directory)
        self.backend.barrier()

    # -- the run ---------------------------------------------------------------------------------
    def train(self, on_update: Callable[[int], None] | None = None) -> dict:
        """Run to --steps (or --stop-after). `on_update(step)` is called on every rank after each update is logged
        (benchmarks interleave other work there; the loop itself needs nothing from it)."""
        t = self.cfg.train
        start_wall = time.perf_counter()
        reporters = build_reporters(reporter_names(t.report_to), self.out, initial_step=self.step,
                                    config=self.cfg.to_dict()) if self.is_main else []
        metrics = MetricsWriter(self.out, enabled=self.is_main, total_steps=t.steps, initial_step=self.step,
                                progress=t.progress, reporters=reporters)
        tokens_per_update = t.global_batch_size * self.cfg.data.seq_len
        first_batch = self.batches_consumed
        target = min(t.steps, t.stop_after) if t.stop_after else t.steps
        self.loader = BatchLoader(self.data, rank=self.dist.rank, world_size=self.dist.world_size,
                                  micro_batch_size=t.micro_batch_size, device=self.dist.device,
                                  start=self.batches_consumed, workers=self.cfg.data.loader_workers)
        try:
            while self.step < target:
                metrics.restart_clock()
                lr = self._lr()
                loss, grad_norm, stepped = self._train_update()
                update_s = metrics.update_time()
                if not stepped:
                    self.consecutive_skips += 1
                    self.skipped_total += 1
                    metrics.event(f"update {self.step}: non-finite loss/grad ({loss}, {grad_norm}), skipped")
                    if self.consecutive_skips >= t.max_consecutive_skips:
                        raise FloatingPointError(f"{self.consecutive_skips} consecutive non-finite updates; aborting"
                                                 " (--max-consecutive-skips)")
                    continue
                self.consecutive_skips = 0
                self.step += 1
                events = self.method.after_update(self.step)
                timing = self._apply_events(events, metrics)
                step = self.step
                speed = throughput_fields(tokens=tokens_per_update, examples=t.global_batch_size, seconds=update_s,
                                          world_size=self.dist.world_size)
                record = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **speed,
                    **self.utilization.fields(speed["tokens_per_s_per_rank"]),
                    **self.method.log_fields(step), "skipped": self.skipped_total, **timing,
                    **self.data.share_fields(self.batches_consumed - 1),
                }
                if self.is_main:  # only rank 0 logs the record: no /proc read elsewhere
                    record.update(memory_fields(self.dist.device))
                if any(not e.routine for e in events):
                    record["events"] = [e.name for e in events if not e.routine]  # what relora-plot marks
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    record["val_loss"] = self.evaluate()
                record["wall_s"] = self.elapsed_before + time.perf_counter() - start_wall  # as summary.json counts it
                if t.compile:
                    record["compiled_graphs"] = compiled_graphs() - self.graphs_before  # flat within a phase: no recompiles
                metrics.log(record)
                if on_update is not None:
                    on_update(step)
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    self.save(self.elapsed_before + time.perf_counter() - start_wall)
            finished = self.step >= t.steps
            val_loss = self.evaluate()
            wall_s = self.elapsed_before + time.perf_counter() - start_wall
            if self.saved_step != self.step:  # not twice for one update (--stop-after on a save step)
                self.save(wall_s)
            if finished and t.export_merged:
                self.export_merged(t.export_merged)
            elif not finished:
                metrics.event(f"stopped after update {self.step} of {t.steps}; continue with --resume")
        finally:
            self.loader.close()
            metrics.close()
        summary = {
            "finished": finished, "method": t.method, "backend": t.backend, "world_size": self.dist.world_size, "steps": self.step,
            "train_tokens": self.batches_consumed * tokens_per_update, "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)), "wall_s": wall_s, **self.method.log_fields(self.step),
            "skipped": self.skipped_total,
            "model_parameters": sum(p.numel() for p in self.backend.unwrapped_model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.backend.unwrapped_model.parameters() if p.requires_grad),
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "accumulation_steps": self.accumulation_steps, "seq_len": self.cfg.data.seq_len,
            "tokens_per_s": (self.batches_consumed - first_batch) * tokens_per_update / max(wall_s - self.elapsed_before, 1e-9),
            "device": str(self.dist.device), "dataset": self.data.source, "startup": self.startup,
        }
        if t.compile:
            summary["compiled_graphs"] = compiled_graphs() - self.graphs_before
        summary["tokens_per_s_per_rank"] = summary["tokens_per_s"] / self.dist.world_size
        if self.is_main:
            write_summary(self.out, summary)
        return summary


def _options(section) -> dict:
    """An engine options dataclass as keyword arguments."""
    return dataclasses.asdict(section) if section is not None else {}
