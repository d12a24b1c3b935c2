"""PyTorch FSDP2 (`fully_shard`): one FSDP unit per decoder layer plus the root, launched with torchrun.

Between steps every parameter (frozen W included) is a DTensor sharded by rows, `Shard(0)` on a 1-D mesh:
rank r holds rows [r*c, min((r+1)*c, d)) with c = ceil(d / world) (torch.chunk), possibly none. The
sharded fp32 parameter is the master (`MixedPrecisionPolicy` casts only what it all-gathers) and AdamW
keeps its states as DTensors of the same layout. So a reset works on local rows in place: W and B share
rows, so a ReLoRA merge `W_local += s * B_local @ A` needs all of A and the local rows of B (one fetch through
`access.FlatRangeShards`).
Checkpoints go through torch.distributed.checkpoint and load at any world size. DCP unpickles a checkpoint's
`.metadata` with plain pickle.load and its non-tensor items (optimizer hyperparameters) with weights_only=False:
`check_checkpoint_data` reads both as data first (tensors DCP itself reads with weights_only=True).
"""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..access import FlatRangeShards, Piece, dormant_modules
from ..models import decoder_layers
from .base import Backend, CheckpointNotData, checkpoint_must_fit, load_checkpoint_file

CHECKPOINT_DIR = "dcp"
METADATA_FILE = ".metadata"


@dataclass
class FSDP2Options:
    reshard_after_forward: bool = True
    """fsdp2: free each layer's gathered parameters after its forward and gather them again for backward (false: keep them, more memory, fewer all-gathers)."""


class RowShards(FlatRangeShards):
    """FSDP2's row shards: pieces are the local rows of the DTensor parameter and of its optimizer states."""

    def __init__(self, optimizer: torch.optim.Optimizer, group, comm_device):
        super().__init__(group, comm_device)
        self.optimizer = optimizer

    def full_shape(self, param):
        return param.shape

    def owned(self, param, rank):
        rows = param.shape[0]
        cols = math.prod(param.shape[1:])  # from the global shape: indexing a DTensor would communicate
        chunk = -(-rows // self.world)
        lo, hi = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        return lo * cols, hi * cols

    def local_fp32(self, param):
        return param.to_local().reshape(-1).to(self.comm_device, torch.float32)

    def _pieces(self, param, tensor) -> list[Piece]:
        lo, hi = self.owned(param, self.rank)
        return [Piece(lo, [tensor.to_local().view(-1)])] if hi > lo else []

    def param_pieces(self, param):
        return self._pieces(param, param)

    def state_pieces(self, param, key):
        # .get: never insert into the optimizer's state defaultdict.
        value = self.optimizer.state.get(param, {}).get(key)
        return self._pieces(param, value) if isinstance(value, DTensor) else []


def _check_row_sharding(model: nn.Module, access: RowShards) -> None:
    """The access layer assumes torch.chunk row shards on a 1-D mesh (not HSDP, not a shard_placement_fn)."""
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"FSDP2 parameter {name} is not row-sharded (Shard(0) on a 1-D mesh): {type(p).__name__}"
                             f" {getattr(p, 'placements', None)}; relora_dist's access layer needs row shards")
        lo, hi = access.owned(p, access.rank)
        if p.to_local().numel() != hi - lo:
            raise ValueError(f"FSDP2 parameter {name}: local shard {tuple(p.to_local().shape)} is not torch.chunk's rows")


class FSDP2Backend(Backend):
    """`dtype="bf16"`: bf16 compute and all-gathers over fp32 sharded masters, gradients reduced in fp32."""

    name = "fsdp2"
    Options = FSDP2Options
    options_section = "fsdp2"

    def __init__(self, *, device: torch.device, dtype: str = "fp32", reshard_after_forward: bool = True, **batch):
        super().__init__(device=device, dtype=dtype, **batch)
        self.reshard_after_forward = reshard_after_forward
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def optimizer_layout(cls, options, *, dtype):
        return "rows"

    # -- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def adopt(cls, wrapped, optimizer, *, dtype="fp32", fp32_values=None):
        if not isinstance(wrapped, FSDPModule):
            return None
        backend = cls(device=next(wrapped.parameters()).device, dtype=dtype)
        _check_row_sharding(wrapped, RowShards(None, None, backend.device))
        backend._model, backend._optimizer = wrapped, optimizer
        return backend

    def setup(self, model, make_optimizer, param_groups):
        self.ensure_process_group()  # FSDP2 needs a mesh even in a plain single process
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        names = {id(p): n for n, p in model.named_parameters()}
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.dtype == "bf16" else MixedPrecisionPolicy()
        model.to(self.device)
        for module in dormant_modules(model):  # sharded like the rest, but outside the blocks' gathers
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        for block in decoder_layers(model):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        for module in dormant_modules(model):  # FSDP2 finalizes every unit after backward: give these their buffers once
            module.unshard()
            module.reshard()
        _check_row_sharding(model, RowShards(None, None, self.device))
        # fully_shard swapped every Parameter for a DTensor one: rebuild the groups by name.
        sharded = dict(model.named_parameters())
        groups = [{**g, "params": [sharded[names[id(p)]] for p in g["params"]]} for g in param_groups]
        self._model = model
        self._optimizer = make_optimizer(groups)

    def release_model(self, build_model):
        state = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True))
        self._model = self._optimizer = None
        return self.rebuilt_model(build_model, state)

    @property
    def model(self):
        return self._model

    @property
    def unwrapped_model(self):
        return self._model

    @property
    def optimizer(self):
        return self._optimizer

    # -- one update -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        self._model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._model.set_requires_gradient_sync(True)

    def clip_gradients(self, max_norm):
        params = [p for p in self._model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the same on every rank
        if max_norm > 0 and math.isfinite(float(norm)):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def zero_grad(self):
        self._optimizer.zero_grad(set_to_none=True)

    def reshard(self) -> None:
        """Free gathered parameters: an eval forward leaves the root's (and, with reshard_after_forward=False,
        every layer's) parameters unsharded, and those copies would not see writes to the shards."""
        for module in self._model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def shard_access(self):
        self.reshard()  # methods write shards; the next forward all-gathers what was written
        return RowShards(self._optimizer, None, self.device)

    def replicated_named_tensors(self):
        """Buffers, and the optimizer states that are plain tensors (step counters, a method's projectors): every
        parameter and its DTensor states are sharded."""
        out = list(self._model.named_buffers())
        for name, param in self._model.named_parameters():
            for key, value in self._optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                    out.append((f"{name}/{key}", value))
        return out

    # -- checkpoints and export -----------------------------------------------------------------------
    def save(self, directory, trainer_state):
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(directory) / CHECKPOINT_DIR))

    def load(self, directory):
        path = Path(directory) / CHECKPOINT_DIR
        if not path.is_dir():
            raise ValueError(f"checkpoint {directory} has no FSDP2 state ({CHECKPOINT_DIR}/ missing; written by another backend?)")
        check_checkpoint_data(path)
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        state = {"model": model_state, "optim": optim_state}
        with checkpoint_must_fit(directory, "this FSDP2 run"):
            with first_failure():
                dcp.load(state, checkpoint_id=str(path))
            set_state_dict(self._model, self._optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def model_state_for_export(self):
        state = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.rank == 0 else {}

    @classmethod
    def checkpoint_model_source(cls, directory):
        return Path(directory) / CHECKPOINT_DIR

    @classmethod
    def read_checkpoint_model(cls, directory):
        """Full model state from the DCP checkpoint, in one process without a process group: the model's tensors
        only, whole, in the dtypes saved (fp32 out)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        path = cls.checkpoint_model_source(directory)
        metadata = check_checkpoint_data(path)
        prefix = "model."
        model = {fqn[len(prefix):]: torch.empty(item.size, dtype=item.properties.dtype)
                 for fqn, item in metadata.state_dict_metadata.items()
                 if fqn.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
        state = {"model": model}
        with first_failure():
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}


def _metadata_classes() -> dict[tuple[str, str], object]:
    """What DCP pickles into `.metadata` (torch 2.13; FSDP2 checkpoints of full, ReLoRA and GaLore runs): its dataclasses
    and the enum of memory formats, each item's file slice (`_StorageInfo`), sizes, dtypes, layouts (by name,
    `_get_layout`) and the checkpoint's path (`StorageMeta.checkpoint_id`). Rebuilding them calls constructors, a
    dict lookup (`_get_layout`) and sets attributes, nothing else."""
    from torch.distributed.checkpoint import metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes = [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta, metadata.TensorProperties,
               metadata.TensorStorageMetadata, metadata.BytesStorageMetadata, metadata.ChunkStorageMetadata,
               metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, torch.serialization._get_layout, pathlib.PosixPath]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    return allowed | {("torch", name): dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's own unpickler with its globals restricted to DCP's metadata classes (the Python docs' "Restricting
    Globals"): anything else is refused before it is imported."""

    def __init__(self, file, allowed: dict[tuple[str, str], object]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return self.allowed[module, name]


def check_checkpoint_data(path: Path):
    """The DCP checkpoint at `path` read as data before DCP reads it: `.metadata` with only DCP's own classes allowed,
    every non-tensor item with weights_only=True. Returns the metadata; a part that is not data is refused by file
    (`CheckpointNotData`), a damaged one is a one-line ValueError."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    file = Path(path) / METADATA_FILE
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes()), _metadata_classes()).load()
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {file} is missing") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("it names "):
            raise CheckpointNotData(file, str(e)) from None
        raise ValueError(f"checkpoint file {file} is truncated or corrupt ({e})") from None
    except Exception as e:
        raise ValueError(f"checkpoint file {file} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint file {file} holds no DCP metadata ({type(metadata).__name__})")
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue  # tensors: DCP reads them with weights_only=True
        where = (metadata.storage_data or {}).get(MetadataIndex(fqn))
        if where is None:
            raise ValueError(f"checkpoint file {file} is corrupt (no storage for {fqn})")
        data = Path(path) / where.relative_path
        if where.transform_descriptors:
            raise CheckpointNotData(data, f"{fqn} is stored through DCP transforms, which relora_dist does not write")
        try:
            with open(data, "rb") as f:
                f.seek(where.offset)
                blob = io.BytesIO(f.read(where.length))
        except OSError as e:
            raise ValueError(f"checkpoint file {data} cannot be read ({e.strerror})") from None
        load_checkpoint_file(blob, name=f"{data} ({fqn})")
    return metadata


@contextlib.contextmanager
def first_failure():
    """DCP hands every rank's exception to all of them wrapped in a CheckpointException, a BaseException with the
    traceback of each in its message: the first rank's own exception instead."""
    try:
        yield
    except dcp.CheckpointException as e:
        failures = list(e.failures.values())
        if not failures:
            raise
        raise failures[0][0] from None
