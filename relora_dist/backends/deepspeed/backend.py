"""DeepSpeed ZeRO 0/1/2/3 behind the Backend interface (`--backend deepspeed --deepspeed CONFIG.json`).

The run's DeepSpeed config is `engine_config.py`'s: the user's JSON plus what relora_dist owns (batch sizes,
clipping, precision, the optimizer, built by the trainer so every backend runs the same AdamW). The loop owns the
accumulation boundary: backward per micro-batch, one `engine.step()` per update. Where ReLoRA's tensors live in each
layout is `layout.py`; in bf16, the exact fp32 copies of the frozen params a method declares `keep_fp32` are
`fp32_copies.py`; the checkpoint files read back outside the engine, `checkpoint.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...access import FlatPartitionOptimizer, dormant_modules, external_parameters, fp32_frozen_parameters, write_pieces
from ...distributed import rank0_first
from ..base import Backend, checkpoint_must_fit, clip_replicated_gradients, set_group_lrs
from .checkpoint import (CHECKPOINT_TAG, MASTER_NAMES_KEY, check_checkpoint_data, check_engine_files, read_checkpoint_model,
                         saved_buffers, saved_frozen_parameters, saved_world_size, universal_checkpoint)
from .engine_config import engine_config, load_engine_config
from .fp32_copies import FrozenShadows, saved_shadows
from .layout import full_parameters, shard_access_for
from .portable_state import has_portable_state, keep_state_convertible, load_portable_state, save_portable_state

logger = logging.getLogger("relora_dist")


def _remove_cpu_shm_buffers(rank: int) -> None:
    """DeepSpeed 0.19.8 on the CPU accelerator maps a ~70 MB /dev/shm file per rank and launch and never
    unlinks it (RAM that outlives the job). Unlink this rank's at exit; peers keep their mappings."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
            path.unlink(missing_ok=True)


@dataclass
class DeepSpeedOptions:
    config: str | None = None
    """DeepSpeed JSON config (ZeRO stage, offload, buckets; see launch/configs/zero*.json). Implies --backend deepspeed."""


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    Options = DeepSpeedOptions
    options_section = "deepspeed"
    defers_gradient_sync = False
    implied_by = "config"  # --deepspeed CONFIG selects this engine

    def __init__(self, *, device: torch.device, dtype: str, config: str | Path | dict, micro_batch_size: int = 1,
                 accumulation_steps: int = 1, max_norm: float = 1.0):
        super().__init__(device=device, dtype=dtype, micro_batch_size=micro_batch_size,
                         accumulation_steps=accumulation_steps, max_norm=max_norm)
        self.config = engine_config(load_engine_config(config), dtype=dtype, micro_batch_size=micro_batch_size,
                                    accumulation_steps=accumulation_steps, world_size=self.world_size, max_norm=max_norm)
        self.stage = self.config["zero_optimization"].get("stage", 0)
        self.engine = None
        self.shadows = FrozenShadows()  # exact fp32 copies of declared frozen params (bf16 only; see setup)
        self._guard = None  # set when the engine steps a plain torch optimizer (see setup)
        if device.type == "cpu":
            atexit.register(_remove_cpu_shm_buffers, self.rank)

    @classmethod
    def check_options(cls, options, *, dtype, micro_batch_size, accumulation_steps, world_size, max_norm):
        if not options.config:
            raise ValueError("--backend deepspeed needs a DeepSpeed JSON config (--deepspeed launch/configs/zero2.json)")
        engine_config(load_engine_config(options.config), dtype=dtype, micro_batch_size=micro_batch_size,
                      accumulation_steps=accumulation_steps, world_size=world_size, max_norm=max_norm)
        if importlib.util.find_spec("deepspeed") is None:  # not imported here: that takes seconds
            raise ValueError("--backend deepspeed needs the deepspeed package (pip install deepspeed)")

    @classmethod
    def optimizer_layout(cls, options, *, dtype):
        """Stage 0 hands the optimizer whole parameters (fp32, or bf16's per-parameter fp32 copies); ZeRO-1/2/3 and
        BF16_Optimizer (bf16 with fp32 gradient accumulation) hand it flat partitions."""
        config = load_engine_config(options.config)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        fp32_accumulation = config.get("data_types", {}).get("grad_accum_dtype") in ("fp32", "float32")
        return "whole" if stage == 0 and not (dtype == "bf16" and fp32_accumulation) else "flat"

    # -- engine lifecycle ---------------------------------------------------------------------------
    def setup(self, model, make_optimizer, param_groups):
        import deepspeed

        self.ensure_process_group()  # DeepSpeed wants one even in a plain single process
        optimizer = make_optimizer(param_groups)
        config = dict(self.config)
        plain = self.stage == 0 and self.dtype == "fp32"
        if plain:
            # DeepSpeed steps a bare torch optimizer without any non-finite check: clip and check here.
            self._guard = _FiniteStepGuard(optimizer, config["gradient_clipping"])
            config["gradient_clipping"] = 0.0
        # DeepSpeed casts every parameter to bf16: take the exact values of the frozen ones a method writes first.
        exact = {name: p.detach().float().clone() for name, p in fp32_frozen_parameters(model)} if self.dtype == "bf16" else {}
        self.engine, *_ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer, config=config)
        self._after_initialize(exact)

    @classmethod
    def adopt(cls, wrapped, optimizer, *, dtype="fp32", fp32_values=None):
        import sys

        if "deepspeed" not in sys.modules:  # no DeepSpeedEngine exists without it; importing it takes seconds
            return None
        from deepspeed import DeepSpeedEngine

        if not isinstance(wrapped, DeepSpeedEngine):
            return None
        backend = cls.__new__(cls)
        Backend.__init__(backend, device=wrapped.device, dtype=dtype, micro_batch_size=wrapped.train_micro_batch_size_per_gpu(),
                         accumulation_steps=wrapped.gradient_accumulation_steps(), max_norm=wrapped.gradient_clipping())
        backend.config, backend.stage = getattr(wrapped, "config", None) or {}, wrapped.zero_optimization_stage()
        backend.engine, backend.shadows, backend._guard = wrapped, FrozenShadows(), None
        if backend.device.type == "cpu":
            atexit.register(_remove_cpu_shm_buffers, backend.rank)
        backend._after_initialize(dict(fp32_values or {}) if dtype == "bf16" else {})
        return backend

    def _after_initialize(self, exact: dict[str, torch.Tensor]) -> None:
        """What follows deepspeed.initialize, whoever called it: ZeRO-3's dormant partitions and external parameters,
        the fp32 copies of the declared frozen parameters (`exact`: their values before DeepSpeed cast them), and the
        layout a flat-partition optimizer needs."""
        import deepspeed

        if self.stage == 3:
            self._partition_dormant()
        if exact:
            access = shard_access_for(self.engine)
            self.shadows = FrozenShadows.place(exact, self.engine.module, lambda p: access.copy_ranges(p, self.rank),
                                               self.engine.device)
        inner = getattr(self.engine.optimizer, "optimizer", None)
        if isinstance(inner, FlatPartitionOptimizer):  # an optimizer that needs each matrix's rows
            access = self.shard_access()
            inner.locate_partitions(access.flat_partitions(), getattr(access, "group", None))
            keep_state_convertible(inner)
        if self.stage == 3:  # ZeRO-3 gathers a module's own parameters for its forward; declared others too
            for module, parameter in external_parameters(self.engine.module):
                deepspeed.zero.register_external_parameter(module, parameter)

    def _partition_dormant(self) -> None:
        """ZeRO-3 partitions every parameter at each step and re-gathers the persistent ones (under
        `stage3_param_persistence_threshold`) right after, frozen ones too. Parameters no forward reads
        (`access.dormant_modules`: SwitchLoRA's pools) are not kept whole: they stay partitioned, and a method's event
        fetches the ranges it needs."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        dormant = {id(p) for module in dormant_modules(self.engine.module) for p in module.parameters()}
        persistent = self.engine.optimizer.persistent_parameters  # the list the step re-gathers (shared with the offload)
        released = [p for p in persistent if id(p) in dormant]
        persistent[:] = [p for p in persistent if id(p) not in dormant]
        for param in released:
            param.ds_persist = False
        whole = [p for p in released if p.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(whole)

    def release_model(self, build_model):
        names = [n for n, _ in self.engine.module.named_parameters()]
        state = full_parameters(self.engine, self.shard_access(), names)
        self.close()
        return self.rebuilt_model(build_model, state)

    def close(self):
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None

    @property
    def model(self):
        return self.engine

    @property
    def unwrapped_model(self):
        return self.engine.module

    @property
    def optimizer(self):
        return self.engine.optimizer

    # -- one update -----------------------------------------------------------------------------------
    def no_sync(self):
        return contextlib.nullcontext()  # gradients are reduced at engine.step() (or partitioned per backward)

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the micro-batch count

    def set_lr(self, lr):
        set_group_lrs(self.engine.optimizer.param_groups, lr)

    def step(self, *, lr, max_norm, loss_is_finite=True):
        self.set_lr(lr)
        self.engine.step()
        if self._guard is not None:
            grad_norm, stepped = self._guard.last_norm, self._guard.last_stepped
        else:
            # ZeRO wrappers and the bf16 ones skip the update themselves when the global norm is non-finite.
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            stepped = self.engine.was_step_applied()
        if stepped and not loss_is_finite:
            logger.warning("non-finite loss but finite gradients: DeepSpeed applied the update")
        return grad_norm, stepped

    def zero_grad(self):
        pass  # engine.step() already cleared the gradients (and its partitioned buffers)

    def shard_access(self):
        return shard_access_for(self.engine, self.shadows)

    # -- checkpoints and export -----------------------------------------------------------------------
    def save(self, directory, trainer_state):
        client_state = {"relora_trainer": trainer_state}
        wrapper = self.engine.optimizer
        if self.stage == 0 and hasattr(wrapper, "fp16_groups"):  # bf16: name the params of the masters it saves
            names = {id(p): n for n, p in self.engine.module.named_parameters()}
            client_state[MASTER_NAMES_KEY] = [[names[id(p)] for p in group] for group in wrapper.fp16_groups]
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)
        if self._partitioned_optimizer() is not None:
            save_portable_state(directory, self.engine.optimizer, self.engine.module, self.rank)
        self.shadows.save(directory, self.rank)

    def save_adopted(self, directory):
        self.shadows.save(Path(directory), self.rank)

    def load_adopted(self, directory):
        if self.shadows:
            self._restore_exact_copies(Path(directory))

    @classmethod
    def check_adopted_checkpoint(cls, directory):
        check_engine_files(Path(directory))

    def _partitioned_optimizer(self):
        """The optimizer inside the ZeRO wrapper when its state is laid out per flat partition, else None."""
        inner = getattr(self.engine.optimizer, "optimizer", None)
        return inner if isinstance(inner, FlatPartitionOptimizer) and not inner.state_reshardable else None

    def load(self, directory):
        directory = Path(directory)
        check_checkpoint_data(directory)  # DeepSpeed unpickles its files with weights_only=False
        saved_ranks = saved_world_size(directory)
        universal = saved_ranks is not None and saved_ranks != self.world_size
        partitioned, native = self._partitioned_optimizer(), directory
        if universal and partitioned is not None and not has_portable_state(directory):
            raise ValueError(f"checkpoint {directory} was written by {saved_ranks} ranks without this optimizer's"
                             f" per-matrix state, which DeepSpeed's universal checkpoint cannot reshard; resume on"
                             f" {saved_ranks} ranks")
        if universal:
            # ZeRO partitions are per rank: another world size reads DeepSpeed's universal checkpoint
            # (converted once, next to the native one).
            logger.info("checkpoint written by %d ranks, loading on %d through a DeepSpeed universal checkpoint",
                        saved_ranks, self.world_size)
            directory = rank0_first(lambda: universal_checkpoint(directory, convert=self.rank == 0),
                                    rank=self.rank, world_size=self.world_size)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.engine.optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = universal  # read by load_checkpoint only
        try:
            with checkpoint_must_fit(directory, "this DeepSpeed run"):
                path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise ValueError(f"checkpoint {directory} has no DeepSpeed engine state (written by another backend?)")
        if universal:
            self._restore_frozen_weights(saved_frozen_parameters(directory.parent))
            self._restore_buffers(saved_buffers(directory.parent))
            # ZeRO-3's universal load (0.19.8) copies group 0's settings, name included, onto every group ...
            for group, saved in zip(self.engine.optimizer.param_groups, settings):
                group.update(saved)
            # ... and hands every sub-group the same `step` tensor, which AdamW then increments once per group.
            inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
            if partitioned is not None:  # what the universal files could not carry, from the per-rank records
                load_portable_state(native, self.engine.optimizer, self.engine.module, self.shard_access().flat_partitions())
        if self.shadows:
            self._restore_exact_copies(native)

    def _restore_exact_copies(self, directory: Path) -> None:
        """The fp32 copies from the checkpoint's records, into every holder (the bf16 ones rounded from them); a
        checkpoint without records (an fp32 run's, or an older one's) leaves the copies what DeepSpeed loaded."""
        saved, access = saved_shadows(directory), self.shard_access()
        params = [(name, p) for name, p in self.engine.module.named_parameters() if p in self.shadows]
        missing = [name for name, _ in params if name not in saved]
        if missing:
            logger.warning("checkpoint %s has no fp32 copy of %d frozen parameters (e.g. %s): they continue from the"
                           " values DeepSpeed loaded", directory, len(missing), missing[0])
        with torch.no_grad():
            for name, param in params:
                if name in saved:
                    write_pieces(access.param_pieces(param), saved[name])
                else:
                    self.shadows.take_from_holders(param, access.param_pieces(param))
        access.after_write([param for _, param in params])

    def _restore_frozen_weights(self, saved: dict[str, torch.Tensor]) -> None:
        """DeepSpeed's universal load restores what the optimizer holds; frozen parameters (outside the optimizer)
        come from the fragments the native checkpoint keeps, into this rank's pieces."""
        access = self.shard_access()
        for name, param in self.engine.module.named_parameters():
            if param.requires_grad:
                continue
            if name not in saved:
                raise ValueError(f"checkpoint has no frozen parameter {name} (written by a run that trained it?)")
            with torch.no_grad():
                write_pieces(access.param_pieces(param), saved[name].reshape(-1))

    def _restore_buffers(self, saved: dict[str, torch.Tensor]) -> None:
        """DeepSpeed's universal load leaves the module's persistent buffers as built: every rank holds them whole."""
        for prefix, module in self.engine.module.named_modules():
            for local, buffer in module._buffers.items():
                if buffer is None or local in module._non_persistent_buffers_set:
                    continue
                name = f"{prefix}.{local}" if prefix else local
                if name not in saved:
                    raise ValueError(f"checkpoint has no buffer {name} (written by another method?)")
                with torch.no_grad():
                    buffer.copy_(saved[name])

    @classmethod
    def checkpoint_model_source(cls, directory):
        return Path(directory) / CHECKPOINT_TAG

    @classmethod
    def read_checkpoint_model(cls, directory):
        return read_checkpoint_model(directory)

    def model_state_for_export(self):
        module = self.engine.module
        names = [n for n, _ in module.named_parameters()]
        state = full_parameters(self.engine, self.shard_access(), names)
        if self.rank != 0:
            return {}
        out = {n: v.cpu() for n, v in state.items()}
        out.update({n: b.detach().cpu() for n, b in module.named_buffers() if n in module.state_dict()})
        return out


    def engine_held_tensors(self):
        return {"exact_copies": self.shadows.tensors()}

    def replicated_named_tensors(self):
        """Tensors every rank holds whole: all params below ZeRO-3, persistent ones at ZeRO-3, the buffers, and the
        exact fp32 copies held whole."""
        out = []
        for name, p in self.engine.module.named_parameters():
            if not hasattr(p, "ds_id") or p.data.numel() == p.ds_numel:
                out.append((name, p.data))
        return out + list(self.engine.module.named_buffers()) + self.shadows.replicated()


class _FiniteStepGuard:
    """Stage 0 fp32 hands DeepSpeed a bare torch optimizer: clip the (already all-reduced) gradients and skip
    the update when their norm is non-finite, the same rule the ZeRO wrappers apply."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.last_norm, self.last_stepped = float("nan"), False
        step = optimizer.step
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def guarded(*args, **kwargs):
            self.last_norm = clip_replicated_gradients(params, max_norm)
            self.last_stepped = math.isfinite(self.last_norm)
            return step(*args, **kwargs) if self.last_stepped else None

        optimizer.step = guarded
