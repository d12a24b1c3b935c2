"""The training loop: one code path for every method and backend.

Per optimizer update: micro-batches (no gradient sync off the boundary) -> clip -> finite check (same
decision on every rank) -> step -> controller -> wrap / merge / prune -> eval -> checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from ..backends import build_backend
from ..data import GlobalBatchPlan, build_data, val_batches
from ..distributed import init_distributed, rank0_first
from ..layer import lora_parameters, relora_layers, wrap
from ..merge import merge_and_reinit_layers
from ..models import build_model, control_config, llama_config
from ..prune import prune_states
from ..schedule import ReLoRAController
from .checkpoint import check_model_fits, claim_run_directory, load_rng, read_trainer_state, resolve_checkpoint, save_checkpoint
from .config import RunConfig, save_yaml
from .consistency import check_replicas
from .faults import FaultPlan
from .metrics import MetricsWriter, write_summary

logger = logging.getLogger("relora_dist")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELORA_CACHE", Path.home() / ".cache" / "relora_dist"))


def build_run_data(cfg: RunConfig):
    """Tokenizer and packed splits of a run (cached: a second call with the same data settings reads the cache)."""
    d = cfg.data
    return build_data(d.dataset, d.tokenizer, seq_len=d.seq_len, vocab_size=d.vocab_size,
                      cache_dir=Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
                      val_fraction=d.val_fraction, text_field=d.text_field)


def optimizer_param_groups(model) -> list[dict]:
    """Full-rank trainables, then A/B as their own named group (backends look groups up by name)."""
    lora_ids = {id(p) for _, p in lora_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in lora_ids], "name": "full_rank"}]
    if lora_ids:
        groups.append({"params": [p for p in trainable if id(p) in lora_ids], "name": "lora"})
    return groups


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.train
        self.dist = init_distributed(timeout_s=t.dist_timeout_s)
        self.faults = FaultPlan.from_env(self.dist.rank)
        self.out = Path(t.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; the run directory must be a folder")
        self.is_main = self.dist.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        # Rank 0 trains the tokenizer and packs the data; the other ranks then read its caches.
        self.data = rank0_first(lambda: build_run_data(cfg), rank=self.dist.rank, world_size=self.dist.world_size)
        self.plan = GlobalBatchPlan(len(self.data.train), t.global_batch_size, t.seed, seq_len=cfg.data.seq_len)
        self.accumulation_steps = self.plan.accumulation_steps(world_size=self.dist.world_size, micro_batch_size=t.micro_batch_size)

        self._eval_sequences = self._eval_set_size(len(self.data.val))

        vocab = len(self.data.tokenizer)
        self.model_config = llama_config(cfg.model.preset, vocab_size=vocab, config_path=cfg.model.config_path,
                                         max_positions=cfg.model.max_positions)
        if cfg.data.seq_len > self.model_config.max_position_embeddings:
            raise ValueError(f"seq_len {cfg.data.seq_len} exceeds the model's max positions"
                             f" {self.model_config.max_position_embeddings} (--seq-len)")
        if t.method == "control":
            self.model_config = control_config(self.model_config, cfg.relora.rank)

        self.controller = ReLoRAController(t.method, t.steps, cfg.relora, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        self.batches_consumed = 0
        self.consecutive_skips = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.saved_step = None

        resume_dir = resolve_checkpoint(t.resume, self.out) if t.resume else None
        if resume_dir is not None:
            check_model_fits(resume_dir, self.model_config.to_dict())
        if resume_dir is None:
            # --resume auto with nothing to resume: a restarted job that died before its first checkpoint
            overwrite = t.overwrite or t.resume == "auto"
            rank0_first(lambda: claim_run_directory(self.out, overwrite=overwrite, is_main=self.is_main),
                        rank=self.dist.rank, world_size=self.dist.world_size)
        if resume_dir is not None:
            saved = read_trainer_state(resume_dir)
            for key in ("method", "backend"):
                if saved.get(key) != getattr(t, key):
                    raise ValueError(f"--resume: {resume_dir} was written with {key} {saved.get(key)!r}, this run uses {getattr(t, key)!r}")
            self.controller.load_state_dict(saved["controller"])

        torch.manual_seed(t.seed)  # identical init on every rank and world size
        model = self._build_model()
        if self.controller.low_rank:
            wrap(model, cfg.relora)
        self.backend = build_backend(t.backend, device=self.dist.device, dtype=t.dtype, config=t.deepspeed,
                                     micro_batch_size=t.micro_batch_size, accumulation_steps=self.accumulation_steps,
                                     max_norm=cfg.optim.grad_clip, reshard_after_forward=t.fsdp_reshard_after_forward)
        self._setup_backend(model)
        # Dropout streams differ per rank (ReLoRA's own randomness never uses the global RNG).
        torch.manual_seed(t.seed * 1000 + 1 + self.dist.rank)
        if resume_dir is not None:
            self._resume(resume_dir)
        if self.is_main:
            save_yaml(cfg, self.out / "config.yaml")

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
    def _build_model(self):
        model = build_model(self.model_config)
        if self.cfg.train.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    def _setup_backend(self, model) -> None:
        self.backend.setup(model, self._make_optimizer, optimizer_param_groups(model))

    def _resume(self, path: Path) -> None:
        state = read_trainer_state(path)
        self.backend.load(path)
        self.batches_consumed = state["batches_consumed"]
        self.skipped_total = state.get("skipped_total", 0)
        self.elapsed_before = state.get("wall_s", 0.0)
        if (state["world_size"] != self.dist.world_size or not load_rng(path, self.dist.rank)) and self.is_main:
            logger.warning("checkpoint written by %d ranks, resumed on %d: dropout RNG streams restart from the seed",
                           state["world_size"], self.dist.world_size)
        if self.is_main:
            logger.info("resumed from %s at update %d", path, self.controller.step)

    # -- one update ------------------------------------------------------------------------------
    def _lr(self) -> float:
        o = self.cfg.optim
        base = (o.lora_lr or o.lr) if self.controller.low_rank else o.lr
        return base * self.controller.lr_factor()

    def _train_update(self) -> tuple[float, float, bool]:
        """Forward/backward over this rank's micro-batches, clip, step if finite. Returns (loss, grad_norm, stepped)."""
        t, backend = self.cfg.train, self.backend
        attempt = self.batches_consumed + 1
        self.faults.before_update(attempt)
        micro = self.plan.local_microbatches(self.batches_consumed, rank=self.dist.rank,
                                             world_size=self.dist.world_size, micro_batch_size=t.micro_batch_size)
        backend.model.train()
        loss_sum = torch.zeros((), device=self.dist.device)
        for i, indices in enumerate(micro):
            batch = self.data.train[indices].to(self.dist.device)
            sync = i == len(micro) - 1
            with (contextlib.nullcontext() if sync else backend.no_sync()):
                with backend.forward_context():
                    loss = backend.model(input_ids=batch, labels=batch).loss / len(micro)
                if i == 0:
                    loss = self.faults.corrupt_loss(loss, attempt)
                backend.backward(loss)
            loss_sum += loss.detach().float()
        loss_mean = backend.all_reduce_sum(loss_sum) / self.dist.world_size
        grad_norm, stepped = backend.step(lr=self._lr(), max_norm=self.cfg.optim.grad_clip,
                                          loss_is_finite=bool(torch.isfinite(loss_mean)))
        backend.zero_grad()
        self.batches_consumed += 1
        return float(loss_mean), grad_norm, stepped

    def _apply_actions(self, actions, metrics: MetricsWriter) -> dict:
        timing = {}
        step = self.controller.step
        if actions.wrap:
            start = time.perf_counter()
            model = self.backend.release_model(self._build_model)
            kept = self.backend.param_states(model.parameters()) if self.cfg.optim.keep_states_at_switch else {}
            wrap(model, self.cfg.relora)  # W becomes frozen; every other Parameter object stays the same
            self._setup_backend(model)  # new optimizer for the low-rank phase (reference behaviour) ...
            self.backend.restore_param_states({p: s for p, s in kept.items() if p.requires_grad})  # ... or carry states over
            timing["wrap_s"] = time.perf_counter() - start
            metrics.event(f"update {step}: warm start done, model wrapped ({len(relora_layers(model))} ReLoRA layers)")
        if actions.merge:
            start = time.perf_counter()
            layers = relora_layers(self.backend.unwrapped_model)
            merge_and_reinit_layers(layers, self.backend.shard_access(), restart_index=actions.merge_index)
            timing["merge_s"] = time.perf_counter() - start
            metrics.event(f"update {step}: merge #{self.controller.merges} ({len(layers)} layers)")
        if actions.reset:
            start = time.perf_counter()
            r = self.cfg.relora
            info = prune_states(lora_parameters(self.backend.unwrapped_model), self.backend.shard_access(),
                                method=r.prune, ratio=r.prune_ratio, seed=r.seed, restart_index=actions.reset_index,
                                reference=r.reference_prune_semantics)
            timing["reset_s"] = time.perf_counter() - start
            metrics.event(f"update {step}: optimizer reset #{self.controller.resets} ({r.prune}, "
                          f"{100 * info['zeroed']:.1f}% of A/B states zero)")
        if (actions.merge or actions.reset) and self.cfg.train.check_replicas:
            check_replicas(self.backend.replicated_named_tensors(), self.dist.device, f"update {step}")
        return timing

    # -- evaluation, checkpoints -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        val = self.data.val[: self._eval_sequences]
        model = self.backend.model
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for batch in val_batches(val, rank=self.dist.rank, world_size=self.dist.world_size, batch_size=t.micro_batch_size):
            batch = batch.to(self.dist.device)
            with self.backend.forward_context():
                loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.numel() - batch.shape[0]  # labels are shifted by one inside the model
            totals += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64, device=self.dist.device)
        model.train()
        self.backend.all_reduce_sum(totals)
        return float(totals[0] / totals[1])

    def _trainer_state(self, wall_s: float) -> dict:
        return {
            "controller": self.controller.state_dict(), "batches_consumed": self.batches_consumed,
            "skipped_total": self.skipped_total, "world_size": self.dist.world_size, "wall_s": wall_s,
            "backend": self.cfg.train.backend, "method": self.cfg.train.method,
            "lora_scale": self.cfg.relora.scale if self.controller.low_rank else None,
        }

    def _write_extra(self, directory: Path) -> None:
        (directory / "model_config.json").write_text(json.dumps(self.model_config.to_dict(), indent=1))
        self.data.tokenizer.save_pretrained(directory / "tokenizer")
        save_yaml(self.cfg, directory / "config.yaml")

    def save(self, wall_s: float) -> Path:
        step = self.saved_step = self.controller.step
        return save_checkpoint(self.out / "checkpoints", step, self.backend, self._trainer_state(wall_s),
                               self._write_extra, keep=self.cfg.train.keep_checkpoints,
                               written=lambda: self.faults.checkpoint_written(step))

    def export_merged(self, directory: str) -> None:
        from ..export import export_merged

        state = self.backend.model_state_for_export()
        if self.is_main:
            scale = self.cfg.relora.scale if self.controller.low_rank else None
            export_merged(state, self.model_config, self.data.tokenizer, directory, scale)
            logger.info("merged HF model written to %s", directory)
        self.backend.barrier()

    # -- the run ---------------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        start_wall = time.perf_counter()
        metrics = MetricsWriter(self.out, enabled=self.is_main, total_steps=t.steps, initial_step=self.controller.step,
                                progress=t.progress)
        tokens_per_update = t.global_batch_size * self.cfg.data.seq_len
        first_batch = self.batches_consumed
        target = min(t.steps, t.stop_after) if t.stop_after else t.steps
        try:
            while self.controller.step < target:
                metrics.restart_clock()
                lr = self._lr()
                loss, grad_norm, stepped = self._train_update()
                update_s = metrics.update_time()
                if not stepped:
                    self.consecutive_skips += 1
                    self.skipped_total += 1
                    metrics.event(f"update {self.controller.step}: non-finite loss/grad ({loss}, {grad_norm}), skipped")
                    if self.consecutive_skips >= t.max_consecutive_skips:
                        raise FloatingPointError(f"{self.consecutive_skips} consecutive non-finite updates; aborting"
                                                 " (--max-consecutive-skips)")
                    continue
                self.consecutive_skips = 0
                actions = self.controller.after_update()
                timing = self._apply_actions(actions, metrics)
                step = self.controller.step
                record = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_update / update_s, "examples_per_s": t.global_batch_size / update_s,
                    "merges": self.controller.merges, "resets": self.controller.resets,
                    "low_rank": self.controller.low_rank, "skipped": self.skipped_total, **timing,
                }
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    record["val_loss"] = self.evaluate()
                metrics.log(record)
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    self.save(self.elapsed_before + time.perf_counter() - start_wall)
            finished = self.controller.step >= t.steps
            val_loss = self.evaluate()
            wall_s = self.elapsed_before + time.perf_counter() - start_wall
            if self.saved_step != self.controller.step:  # not twice for one update (--stop-after on a save step)
                self.save(wall_s)
            if finished and t.export_merged:
                self.export_merged(t.export_merged)
            elif not finished:
                metrics.event(f"stopped after update {self.controller.step} of {t.steps}; continue with --resume")
        finally:
            metrics.close()
        summary = {
            "finished": finished, "method": t.method, "backend": t.backend, "world_size": self.dist.world_size, "steps": self.controller.step,
            "train_tokens": self.batches_consumed * tokens_per_update, "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)), "wall_s": wall_s, "merges": self.controller.merges,
            "resets": self.controller.resets, "skipped": self.skipped_total,
            "model_parameters": sum(p.numel() for p in self.backend.unwrapped_model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.backend.unwrapped_model.parameters() if p.requires_grad),
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "accumulation_steps": self.accumulation_steps, "seq_len": self.cfg.data.seq_len,
            "tokens_per_s": (self.batches_consumed - first_batch) * tokens_per_update / max(wall_s - self.elapsed_before, 1e-9),
            "device": str(self.dist.device), "dataset": self.data.source,
        }
        summary["tokens_per_s_per_rank"] = summary["tokens_per_s"] / self.dist.world_size
        if self.is_main:
            write_summary(self.out, summary)
        return summary
