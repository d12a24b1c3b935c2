"""The neutral tensor-access layer between engines and methods.

Engines (`backends/`) implement `TensorAccess`: where this rank's pieces of each parameter and optimizer
state live, and the few collectives a method's events need (all-reduce, a fetch of named flat ranges
through one all_to_all, a gather of small tensors). Methods (`methods/`: ReLoRA's merge and prune, SwitchLoRA's
switch) use it and never look inside an engine; engines know nothing of methods.

A piece is a flat range of the *full* flattened tensor: replicated engines hand out one piece starting
at 0; ZeRO-1/2 fragments, ZeRO-3 `ds_tensor` slices and FSDP2 row shards are flat ranges too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

# Flat elements [lo, hi) of a parameter's full flattened tensor.
Range = tuple[nn.Parameter, int, int]

# What the tensors an engine's optimizer steps are (`Backend.optimizer_layout`, `Method.check_optimizer_layout`):
# whole parameters (single process, DDP, ZeRO-0, the owners of OSS / ZeroRedundancyOptimizer), DTensor row shards
# of each parameter (FSDP2), or flat partitions that cut across parameters (DeepSpeed ZeRO-1/2/3, BF16_Optimizer).
OPTIMIZER_LAYOUTS = ("whole", "rows", "flat")


@dataclass
class Piece:
    """Elements [start, start + numel) of a full flattened tensor held by this rank.

    `views` are all writable holders of those elements (low-precision param, fp32 master, ...):
    every write must reach all of them, in place.
    """

    start: int
    views: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        # Holders can alias (ZeRO-3 at world size 1 gathers W into its own ds_tensor): a merge adds to
        # each view, so each memory range must appear once.
        seen, distinct = set(), []
        for view in self.views:
            key = (view.data_ptr(), view.numel(), view.dtype, view.device)
            if key not in seen:
                seen.add(key)
                distinct.append(view)
        self.views = distinct

    @property
    def numel(self) -> int:
        return self.views[0].numel() if self.views else 0


@dataclass
class FlatPartition:
    """Where one parameter's elements sit in the flat tensors an engine's optimizer steps (layout `flat`): rank r's
    partition holds elements `ranges[r]` = [lo, hi) of the flattened parameter (lo == hi: none), this rank's at
    `offset` in the flat tensor (None where it holds none). Every rank lists the same parameters in the same order."""

    param: nn.Parameter
    shape: torch.Size
    ranges: list[tuple[int, int]]
    offset: int | None


@runtime_checkable
class FlatPartitionOptimizer(Protocol):
    """What an optimizer that steps flat partitions offers the engine that partitions it (DeepSpeed ZeRO-1/2/3, whose
    wrapper hands it flat tensors cutting across parameters): it is told where each parameter sits, and it carries
    state DeepSpeed's universal checkpoint cannot reshard in world-size-free records."""

    def locate_partitions(self, partitions: dict[int, list[FlatPartition]], group=None) -> None:
        """Called once the engine is set up: id of each flat tensor the optimizer steps -> its `FlatPartition`s (the
        same parameters in the same order on every rank, `TensorAccess.flat_partitions`), and the process group the
        partitions are spread over."""

    @property
    def state_reshardable(self) -> bool:
        """False when some state is laid out per flat partition (not element-wise, or element-wise under keys the
        universal checkpoint drops): the engine then saves `portable_state` beside its checkpoint."""

    def portable_state(self) -> dict:
        """This rank's records of that state, keyed by model parameter, independent of the partitioning."""

    def load_portable_state(self, records: list[dict]) -> list[torch.Tensor]:
        """Rebuild that state from the records of every saved rank (any number of them); returns the flat tensors
        whose state was replaced (the engine drops its own views of what it loaded for them)."""


def external_parameters(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, a parameter another module owns that this module's forward reads), as modules declare it with an
    `external_parameters()` method. Engines that gather parameters module by module (ZeRO-3) gather these too."""
    return [(module, p) for module in model.modules() if callable(getattr(module, "external_parameters", None))
            for p in module.external_parameters()]


def dormant_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose parameters no forward reads, only a method's events (SwitchLoRA's candidate pools), as they
    declare it with `dormant = True`. Engines that gather a block's parameters for its forward keep these apart
    (FSDP2: their own unit, never unsharded; ZeRO-3 gathers by module and never meets them in a forward, and never
    keeps them persistent)."""
    return [module for module in model.modules() if getattr(module, "dormant", False)]


def fp32_frozen_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, frozen parameter) that a method writes in place often and so needs exact, as modules declare it with
    `keep_fp32 = ("weight", ...)` (SwitchLoRA folds into W and parks vectors in its pools every update). An engine
    that holds parameters in a lower precision keeps an fp32 copy of its pieces of them, which fetches read and
    writes reach, and rounds it into the low-precision holders in `after_write`; fp32 engines need nothing."""
    out = []
    for prefix, module in model.named_modules():
        for local in getattr(module, "keep_fp32", ()):
            param = module._parameters.get(local)
            if param is not None and not param.requires_grad:
                out.append((f"{prefix}.{local}" if prefix else local, param))
    return out


def write_pieces(pieces: list[Piece], full_flat: torch.Tensor, start: int = 0) -> None:
    """Copy this rank's ranges of a flat tensor into every holder of them; `full_flat` holds the elements from `start`
    on (0: the whole tensor) and covers every piece."""
    for piece in pieces:
        src = full_flat[piece.start - start : piece.start - start + piece.numel]
        for view in piece.views:
            view.copy_(src.to(device=view.device, dtype=view.dtype))


def range_key(wanted: list[Range]) -> list[tuple[int, int, int]]:
    """Comparable form of a range list (parameters compare by identity)."""
    return [(id(p), lo, hi) for p, lo, hi in wanted]


class TensorAccess(ABC):
    """Where parameters and their optimizer states live on this rank, and the collectives over the ranks
    that share them. Every rank must call every collective method in the same order with the same arguments.

    `world` is the number of ranks the pieces are spread over (1 when every rank holds everything) and
    `rank` this rank's index among them.
    """

    rank: int = 0
    world: int = 1

    # -- where the pieces live --------------------------------------------------------------------
    @abstractmethod
    def param_pieces(self, param: nn.Parameter) -> list[Piece]:
        """Writable local pieces of a parameter, frozen or trainable: every holder (param, fp32 master)."""

    @abstractmethod
    def state_pieces(self, param: nn.Parameter, key: str) -> list[Piece]:
        """Local pieces of an optimizer state of `param`; empty where this rank holds none (yet)."""

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        """Shape of the whole tensor (ZeRO-3 params are empty outside gathers)."""
        return param.shape

    def spans(self, params: list[nn.Parameter]) -> list[list[tuple[int, int]]]:
        """Per param, per rank: the flat span [lo, hi) that rank's `param_pieces` cover (the same answer on every
        rank; collective where ranks can disagree). Default: every rank holds every param whole."""
        return [[(0, self.full_shape(p).numel())] * self.world for p in params]

    # -- collectives --------------------------------------------------------------------------------
    @abstractmethod
    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum over the ranks whose pieces are disjoint (no-op when every rank holds everything)."""

    @abstractmethod
    def full_fp32(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 values (masters where they exist) of small params, in one packed collective."""

    def fetch_fp32(self, wanted: list[list[Range]]) -> list[torch.Tensor]:
        """`wanted[r]`: the flat ranges rank r needs (the same lists on every rank). Returns this rank's ranges
        as flat fp32 tensors (masters where they exist), in order. Default: one `full_fp32` of every parameter
        any rank wants, then slices."""
        distinct = list({id(p): p for ranges in wanted for p, _, _ in ranges}.values())
        full = {id(p): t.reshape(-1) for p, t in zip(distinct, self.full_fp32(distinct))}
        return [full[id(p)][lo:hi] for p, lo, hi in wanted[self.rank]]

    def reduction_share(self, param: nn.Parameter) -> list[tuple[int, torch.Tensor]]:
        """(start, flat fp32 values) of this rank's share of `param` for a sum over the ranks (`all_reduce_sum_`): the
        shares of all ranks are disjoint and cover the tensor once, masters where they exist (SST's column norms: each
        rank sums its share, one all-reduce adds them). Default: every rank holds the whole (`world` 1)."""
        if self.world != 1:
            raise NotImplementedError(f"{type(self).__name__} does not say its reduction shares")
        return [(0, self.full_fp32([param])[0].reshape(-1))]

    def after_write(self, params: list[nn.Parameter]) -> None:
        """Values of these params were written outside the engine's step: drop engine caches of them (e.g. ZeRO++
        secondary partitions) and round exact copies into low-precision holders (`fp32_frozen_parameters`). Every
        writer calls it once its writes are done."""

    def flat_partitions(self) -> dict[int, list[FlatPartition]]:
        """For engines whose optimizer steps flat partitions: id of each flat tensor the optimizer steps -> the
        parameters in it, in the same order on every rank. Empty where the optimizer steps the parameters themselves."""
        return {}


class ReplicatedAccess(TensorAccess):
    """Single process, DDP, and owner-sharded optimizers: every rank holds every parameter whole and the states
    of the parameters its `optimizer` steps; nothing to communicate."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer

    def full_fp32(self, params):
        return [p.detach().float().clone() for p in params]

    def fetch_fp32(self, wanted):
        return [p.detach().reshape(-1)[lo:hi].float().clone() for p, lo, hi in wanted[self.rank]]  # no whole copies

    def param_pieces(self, param):
        return [Piece(0, [param.data.view(-1)])]

    def state_pieces(self, param, key):
        # .get: never insert into the optimizer's state defaultdict (SPEC section 7).
        state = self.optimizer.state.get(param, {}) if self.optimizer is not None else {}
        tensor = state.get(key)
        return [Piece(0, [tensor.view(-1)])] if isinstance(tensor, torch.Tensor) and tensor.numel() > 1 else []

    def all_reduce_sum_(self, tensor):
        pass


class PartitionedAccess(TensorAccess):
    """Ranks hold disjoint pieces of the same tensors; collectives run on the engine's device (NCCL needs CUDA
    tensors even for CPU-offloaded masters and CPU-side quantile histograms)."""

    def __init__(self, group, comm_device):
        self.group = group
        self.comm_device = torch.device(comm_device)
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1

    def all_reduce_sum_(self, tensor):
        if self.world > 1:
            work = tensor.to(self.comm_device)
            dist.all_reduce(work, group=self.group)
            if work is not tensor:
                tensor.copy_(work)

    def all_ranks_agree(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (one byte all-reduced)."""
        value = torch.tensor([int(flag)], dtype=torch.uint8, device=self.comm_device)
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())


class FlatRangeShards(PartitionedAccess):
    """Each rank holds elements [lo, hi) of every flattened tensor (possibly none): ZeRO-3 `ds_tensor` slices,
    FSDP2 row shards. A fetch of named ranges is one all_to_all; nothing is gathered whole."""

    @abstractmethod
    def owned(self, param: nn.Parameter, rank: int) -> tuple[int, int]:
        """Flat range [lo, hi) of the whole tensor that `rank` holds (padding excluded)."""

    @abstractmethod
    def local_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's fp32 values (masters where they exist) of its range, flat, on the comm device."""

    def spans(self, params):
        return [[self.owned(p, r) for r in range(self.world)] for p in params]

    def reduction_share(self, param):
        lo, hi = self.owned(param, self.rank)
        return [(lo, self.local_fp32(param)[: hi - lo])] if hi > lo else []

    def _overlaps(self, wanted: list[Range], holder: int) -> list[tuple[int, int, int]]:
        """(index into `wanted`, lo, hi): the parts of each wanted range that `holder` owns."""
        out = []
        for index, (param, lo, hi) in enumerate(wanted):
            own_lo, own_hi = self.owned(param, holder)
            lo, hi = max(lo, own_lo), min(hi, own_hi)
            if hi > lo:
                out.append((index, lo, hi))
        return out

    def fetch_fp32(self, wanted):
        mine = wanted[self.rank]
        local: dict[int, torch.Tensor] = {}

        def own_values(param) -> torch.Tensor:
            if id(param) not in local:
                local[id(param)] = self.local_fp32(param)
            return local[id(param)]

        send_parts, send_sizes, recv_plan, recv_sizes = [], [], [], []
        for other in range(self.world):
            outgoing = [] if other == self.rank else self._overlaps(wanted[other], self.rank)
            incoming = [] if other == self.rank else self._overlaps(mine, other)
            for index, lo, hi in outgoing:
                param = wanted[other][index][0]
                own_lo = self.owned(param, self.rank)[0]
                send_parts.append(own_values(param)[lo - own_lo : hi - own_lo])
            send_sizes.append(sum(hi - lo for _, lo, hi in outgoing))
            recv_plan.append(incoming)
            recv_sizes.append(sum(hi - lo for _, lo, hi in incoming))
        device = self.comm_device
        received = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)
        if self.world > 1:
            send = torch.cat(send_parts) if send_parts else torch.zeros(0, device=device)
            dist.all_to_all_single(received, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=self.group)

        out = [torch.full((hi - lo,), float("nan"), device=device) for _, lo, hi in mine]
        for index, lo, hi in self._overlaps(mine, self.rank):  # what this rank holds itself
            param, base = mine[index][0], mine[index][1]
            own_lo = self.owned(param, self.rank)[0]
            out[index][lo - base : hi - base] = own_values(param)[lo - own_lo : hi - own_lo]
        offset = 0
        for incoming in recv_plan:
            for index, lo, hi in incoming:
                base = mine[index][1]
                out[index][lo - base : hi - base] = received[offset : offset + hi - lo]
                offset += hi - lo
        return out

    def full_fp32(self, params):
        """Whole fp32 values in one all_gather of the (padded) local ranges."""
        sizes = [max(hi - lo for lo, hi in (self.owned(p, r) for r in range(self.world))) for p in params]
        local = torch.zeros(sum(sizes), dtype=torch.float32, device=self.comm_device)
        offset = 0
        for p, size in zip(params, sizes):
            lo, hi = self.owned(p, self.rank)
            local[offset : offset + hi - lo] = self.local_fp32(p)[: hi - lo]
            offset += size
        gathered = torch.empty(self.world * local.numel(), dtype=torch.float32, device=self.comm_device)
        if self.world > 1:
            dist.all_gather_into_tensor(gathered, local, group=self.group)
        else:
            gathered.copy_(local)
        per_rank = gathered.view(self.world, -1)
        out, offset = [], 0
        for p, size in zip(params, sizes):
            full = torch.empty(self.full_shape(p).numel(), dtype=torch.float32, device=self.comm_device)
            for r in range(self.world):
                lo, hi = self.owned(p, r)
                full[lo:hi] = per_rank[r, offset : offset + hi - lo]
            out.append(full.view(self.full_shape(p)))
            offset += size
        return out


def add_in_fp32(view: torch.Tensor, delta: torch.Tensor) -> None:
    """`view += delta`, added in fp32 and rounded once, so a bf16 holder sees one rounding per write (ReLoRA's merge,
    SwitchLoRA's fold)."""
    if view.dtype == torch.float32:
        view.add_(delta.to(view.device))
    else:
        view.copy_(view.float().add_(delta.to(view.device)))


__all__ = ["OPTIMIZER_LAYOUTS", "FlatPartition", "FlatPartitionOptimizer", "Piece", "Range", "TensorAccess", "ReplicatedAccess", "PartitionedAccess", "FlatRangeShards",
           "write_pieces", "range_key", "add_in_fp32"]
