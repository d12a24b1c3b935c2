"""Where W, A, B, their fp32 masters and Adam states live inside a DeepSpeed 0.19 engine.

The layout is detected by capability (what the optimizer wrapper holds), not from the config:

| wrapper                                   | masters                              | access class        |
|-------------------------------------------|--------------------------------------|---------------------|
| plain torch optimizer (stage 0, fp32)     | the params themselves                | ReplicatedAccess    |
| FP16_(Unfused)Optimizer (stage 0, bf16)   | replicated fp32 copies               | ReplicatedMasters   |
| DeepSpeedZeroOptimizer, BF16_Optimizer    | a flat fp32 partition per rank       | PartitionedMasters  |
| DeepSpeedZeroOptimizer_Stage3             | `ds_tensor` slices, fp32 slices      | Stage3Slices        |

Every holder of a trainable param is written (low-precision param, master, state), in place: params are
views into flat buffers the engine communicates. See research/distributed_internals.md section 2. In bf16, the frozen
params a method declares `keep_fp32` also have an fp32 copy of this rank's range (`fp32_copies.py`): it is
read as their fp32 value, written first, and rounded into the bf16 holders by `after_write`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...access import FlatPartition, FlatRangeShards, PartitionedAccess, Piece, ReplicatedAccess, TensorAccess
from .fp32_copies import FrozenShadows


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def _offset_in(buffer: torch.Tensor, view: torch.Tensor) -> int:
    """Element offset of `view`'s storage inside the flat `buffer` it is a view of."""
    return (view.data_ptr() - buffer.data_ptr()) // buffer.element_size()


def _frozen_fp32(shadows: FrozenShadows, param: nn.Parameter, lo: int, hi: int) -> torch.Tensor:
    """Flat fp32 values [lo, hi) of a frozen param every rank holds whole: its exact copy, else the param itself."""
    copy = shadows.covering(param, lo, hi - lo)
    return (copy if copy is not None else _flat(param.data)[lo:hi]).float().clone()


def _round_copies(access, params) -> None:
    for param in params:
        if param in access.shadows:
            access.shadows.round_into_holders(param, access.param_pieces(param))


def _whole_copy_ranges(param: nn.Parameter, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(held, saved) flat ranges of an exact fp32 copy where every rank holds the param whole: rank 0 saves it."""
    whole = (0, param.numel())
    return whole, whole if rank == 0 else (0, 0)


def _state_tensor(optimizer: torch.optim.Optimizer, holder: torch.Tensor, key: str) -> torch.Tensor | None:
    # .get: never insert into the optimizer's state defaultdict.
    value = optimizer.state.get(holder, {}).get(key)
    return value if isinstance(value, torch.Tensor) and value.numel() > 1 else None


class ReplicatedMasters(TensorAccess):
    """ZeRO-0 with bf16/fp16: every rank holds each param whole plus a replicated fp32 copy."""

    def __init__(self, wrapper, shadows: FrozenShadows | None = None):
        self.inner = wrapper.optimizer
        self.shadows = shadows or FrozenShadows()
        self.master: dict[int, torch.Tensor] = {}
        if hasattr(wrapper, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 tensor per param
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    self.master[id(lp)] = (hp, hp)
        else:  # FP16_Optimizer: one flat fp32 tensor per group, params back to back in group order
            for lp_group, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat):
                offset = 0
                for lp in lp_group:
                    self.master[id(lp)] = (flat.narrow(0, offset, lp.numel()), flat)
                    offset += lp.numel()

    def full_fp32(self, params):
        return [self.master[id(p)][0].detach().view(p.shape).float().clone() if id(p) in self.master
                else _frozen_fp32(self.shadows, p, 0, p.numel()).view(p.shape) for p in params]

    def fetch_fp32(self, wanted):
        return [_flat(self.master[id(p)][0].detach())[lo:hi].float().clone() if id(p) in self.master
                else _frozen_fp32(self.shadows, p, lo, hi) for p, lo, hi in wanted[self.rank]]

    def param_pieces(self, param):
        masters = [_flat(self.master[id(param)][0])] if id(param) in self.master else []  # frozen params have none
        return self.shadows.with_copy(param, [Piece(0, [_flat(param.data)] + masters)])

    def after_write(self, params):
        _round_copies(self, params)

    copy_ranges = staticmethod(_whole_copy_ranges)

    def state_pieces(self, param, key):
        if id(param) not in self.master:
            return []
        view, holder = self.master[id(param)]
        state = _state_tensor(self.inner, holder, key)
        if state is None:
            return []
        return [Piece(0, [state.narrow(0, _offset_in(holder, view), view.numel()) if holder is not view else _flat(state)])]

    def all_reduce_sum_(self, tensor):
        pass


class PartitionedMasters(PartitionedAccess):
    """ZeRO-1/2 and BF16_Optimizer: full low-precision params on every rank (views into a flat buffer),
    fp32 masters and Adam states as one flat partition per rank and group.

    A param's fragment is derived from where `p.data` sits inside the flat buffer, not from
    `p._hp_mapping`, which points at the wrong slice with `round_robin_gradients` (DeepSpeed 0.19.8).
    """

    def __init__(self, wrapper, group=None, comm_device="cpu", shadows: FrozenShadows | None = None):
        super().__init__(group, comm_device)
        self.inner = wrapper.optimizer
        self.shadows = shadows or FrozenShadows()
        if hasattr(wrapper, "single_partition_of_fp32_groups"):
            groups, flats, masters = wrapper.bit16_groups, wrapper.bit16_groups_flat, wrapper.single_partition_of_fp32_groups
            partitions = wrapper.parallel_partitioned_bit16_groups
        else:  # BF16_Optimizer
            groups, flats, masters = wrapper.bf16_groups, wrapper.bf16_groups_flat, wrapper.fp32_groups_flat_partition
            partitions = wrapper.bf16_partitioned_groups
        self.fragment: dict[int, tuple[int, int, torch.Tensor, int]] = {}  # id -> (start in p, numel, master, offset)
        self.lp_is_master = all(flat.dtype == torch.float32 for flat in flats)
        self.layout = list(zip(groups, flats, masters, partitions))
        for params, flat, master, parts in zip(groups, flats, masters, partitions):
            own = parts[self.rank]
            part_start, part_end = _offset_in(flat, own), _offset_in(flat, own) + own.numel()
            for p in params:
                begin = _offset_in(flat, p.data)
                lo, hi = max(begin, part_start), min(begin + p.numel(), part_end)
                if hi > lo:
                    self.fragment[id(p)] = (lo - begin, hi - lo, master, lo - part_start)

    def flat_partitions(self):
        out = {}
        for params, flat, master, parts in self.layout:
            bounds = [(_offset_in(flat, part), _offset_in(flat, part) + part.numel()) for part in parts]
            entries = []
            for p in params:
                begin, numel = _offset_in(flat, p.data), p.numel()
                ranges = [(min(max(lo - begin, 0), numel), min(max(hi - begin, 0), numel)) for lo, hi in bounds]
                lo, hi = ranges[self.rank]
                entries.append(FlatPartition(p, p.shape, ranges, begin + lo - bounds[self.rank][0] if hi > lo else None))
            out[id(master)] = entries
        return out

    def _master_view(self, param) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        if id(param) not in self.fragment:
            return None
        start, numel, master, offset = self.fragment[id(param)]
        return start, master.narrow(0, offset, numel), master

    def full_fp32(self, params):
        """Frozen params from every rank's whole copy; trainable ones from the masters, one packed all-reduce."""
        out = {id(p): _frozen_fp32(self.shadows, p, 0, p.numel()).view(p.shape) for p in params if not p.requires_grad}
        trainable = [p for p in params if p.requires_grad]
        if self.lp_is_master:  # fp32 training: the engine copies the masters into the params every step
            out.update({id(p): p.detach().float().clone() for p in trainable})
        elif trainable:  # each rank writes its master fragments at their global offsets
            sizes = [p.numel() for p in trainable]
            packed = torch.zeros(sum(sizes), dtype=torch.float32, device=self.comm_device)
            offset = 0
            for p, size in zip(trainable, sizes):
                found = self._master_view(p)
                if found is not None:
                    start, view, _ = found
                    packed[offset + start : offset + start + view.numel()].copy_(view)
                offset += size
            self.all_reduce_sum_(packed)
            out.update({id(p): chunk.view(p.shape).clone() for chunk, p in zip(packed.split(sizes), trainable)})
        return [out[id(p)] for p in params]

    def fetch_fp32(self, wanted):
        """Trainable params whole through `full_fp32` (their masters are partitioned); frozen ranges locally."""
        trainable = list({id(p): p for ranges in wanted for p, _, _ in ranges if p.requires_grad}.values())
        full = {id(p): t.reshape(-1) for p, t in zip(trainable, self.full_fp32(trainable))}
        return [full[id(p)][lo:hi] if id(p) in full else _frozen_fp32(self.shadows, p, lo, hi)
                for p, lo, hi in wanted[self.rank]]

    def reduction_share(self, param):
        """A trainable param's master fragment; a frozen one (held whole everywhere) counted by rank 0."""
        found = self._master_view(param)
        if found is not None:
            return [(found[0], found[1].float())]
        if not param.requires_grad and self.rank == 0:
            return [(0, _frozen_fp32(self.shadows, param, 0, param.numel()))]
        return []

    def param_pieces(self, param):
        pieces = self.shadows.with_copy(param, [Piece(0, [_flat(param.data)])])  # frozen params have no master fragment
        found = self._master_view(param)
        if found is not None:
            start, view, _ = found
            pieces.append(Piece(start, [view]))
        return pieces

    def after_write(self, params):
        _round_copies(self, params)

    copy_ranges = staticmethod(_whole_copy_ranges)

    def state_pieces(self, param, key):
        found = self._master_view(param)
        if found is None:
            return []
        start, view, master = found
        state = _state_tensor(self.inner, master, key)
        if state is None:
            return []
        return [Piece(start, [state.narrow(0, _offset_in(master, view), view.numel())])]


class Stage3Slices(FlatRangeShards):
    """ZeRO-3: every param (frozen W too) is a 1-D slice `ds_tensor` of ceil(numel / world) elements;
    the last rank's slice is padded. Persistent params also keep a full `p.data` between steps.

    A fetch of named ranges is one all_to_all from the ranks' master slices, or nothing when every rank holds
    what it wants whole in fp32 (persistent params without offload). Nothing is gathered to write it.
    """

    def __init__(self, wrapper, group=None, comm_device="cpu", shadows: FrozenShadows | None = None):
        super().__init__(group, comm_device)
        self.shadows = shadows or FrozenShadows()
        self.wrapper = wrapper
        self.inner = wrapper.optimizer
        self.offloaded = bool(getattr(wrapper, "offload_optimizer", False))
        if any(wrapper._swappable_optimizer_subgroup(i) for i in range(len(wrapper.fp16_groups))):
            raise ValueError("NVMe optimizer offload is not supported by relora_dist's ZeRO-3 reset (use cpu offload)")

    def full_shape(self, param):
        return param.ds_shape

    def owned(self, param, rank):
        size = param.ds_tensor.ds_numel
        return rank * size, rank * size + max(0, min(param.ds_numel - rank * size, size))

    def local_fp32(self, param):
        if not param.requires_grad:  # frozen (W, SwitchLoRA's pools): no master, its exact copy or the partition itself
            start, valid = self._range(param)
            copy = self.shadows.covering(param, start, valid)
            held = copy if copy is not None else param.ds_tensor.narrow(0, 0, valid)
            return held.to(self.comm_device, torch.float32)
        return self._master_slice(param).to(self.comm_device, torch.float32)

    def _range(self, param) -> tuple[int, int]:
        lo, hi = self.owned(param, self.rank)
        return lo, hi - lo

    def _votes(self, flags: list[bool]) -> list[int]:
        """How many ranks say True, per flag (one tiny all-reduce)."""
        counts = torch.tensor([float(f) for f in flags])
        self.all_reduce_sum_(counts)
        return [int(c) for c in counts.tolist()]

    def _fp32_whole(self, params) -> bool:
        return not self.offloaded and all(self._whole_data(p) is not None and p.dtype == torch.float32 for p in params)

    @staticmethod
    def _whole_data(param) -> torch.Tensor | None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel:
            return _flat(param.data)
        return None

    def _master_slice(self, param, key: str | None = None) -> torch.Tensor:
        group, offset, numel = self.wrapper.grad_position[self.wrapper.get_param_id(param)]
        flat = self.wrapper.fp32_partitioned_groups_flat[group]
        holder = flat if key is None else self.inner.state[flat][key]
        return holder.narrow(0, offset, numel)

    def _pieces(self, param, slice_views: list[torch.Tensor]) -> list[Piece]:
        start, valid = self._range(param)
        full = self._whole_data(param)
        views = [v.narrow(0, 0, valid) for v in slice_views]
        if full is None:
            return [Piece(start, views)] if valid else []
        # The full copy's own range gets the same values as the slice; the rest in two more pieces.
        pieces = [Piece(0, [full.narrow(0, 0, start)]), Piece(start + valid, [full.narrow(0, start + valid, param.ds_numel - start - valid)])]
        return [Piece(start, views + [full.narrow(0, start, valid)])] + [pc for pc in pieces if pc.numel]

    def full_fp32(self, params):
        if self._votes([self._fp32_whole(params)])[0] == self.world:
            return [p.detach().clone() for p in params]  # persistent fp32 params are their own masters
        return super().full_fp32(params)

    def spans(self, params):
        """A rank holding a param whole (persistent, or left gathered by a forward) covers all of it. Who does is
        decided together: one byte per rank and param, all-reduced (each rank fills its own row)."""
        held = torch.zeros(self.world, len(params), dtype=torch.uint8, device=self.comm_device)
        held[self.rank] = torch.tensor([self._whole_data(p) is not None for p in params], dtype=torch.uint8)
        if self.world > 1:
            torch.distributed.all_reduce(held, group=self.group)
        whole = held.cpu().tolist()
        return [[(0, p.ds_numel) if whole[r][i] else self.owned(p, r) for r in range(self.world)]
                for i, p in enumerate(params)]

    def fetch_fp32(self, wanted):
        # Whole fp32 params on every rank (their own masters) need no communication.
        if self.all_ranks_agree(self._fp32_whole([p for p, _, _ in wanted[self.rank]])):
            return [self._whole_data(p)[lo:hi].clone() for p, lo, hi in wanted[self.rank]]
        return super().fetch_fp32(wanted)

    def param_pieces(self, param):
        # Frozen params have no master. In pure fp32 without offload the master aliases ds_tensor: writing both
        # is harmless.
        masters = [self._master_slice(param)] if param.requires_grad else []
        return self.shadows.with_copy(param, self._pieces(param, [param.ds_tensor] + masters))

    def state_pieces(self, param, key):
        flat = self.wrapper.fp32_partitioned_groups_flat[self.wrapper.grad_position[self.wrapper.get_param_id(param)][0]]
        if _state_tensor(self.inner, flat, key) is None:
            return []
        start, valid = self._range(param)  # padding excluded: zeros would shift the quantile
        return [Piece(start, [self._master_slice(param, key).narrow(0, 0, valid)])] if valid else []

    def flat_partitions(self):
        w = self.wrapper
        out = {}
        for params, flat in zip(w.fp16_groups, w.fp32_partitioned_groups_flat):
            entries = []
            for p in params:
                size = p.ds_tensor.ds_numel
                ranges = [(min(r * size, p.ds_numel), min((r + 1) * size, p.ds_numel)) for r in range(self.world)]
                lo, hi = ranges[self.rank]
                entries.append(FlatPartition(p, p.ds_shape, ranges, w.grad_position[w.get_param_id(p)][1] if hi > lo else None))
            out[id(flat)] = entries
        return out

    def after_write(self, params):
        _round_copies(self, params)
        for param in params:  # ZeRO++ hpZ keeps a secondary copy that only trainable groups invalidate
            if getattr(param, "ds_secondary_tensor", None) is not None:
                param.ds_secondary_tensor = None

    def copy_ranges(self, param, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(held, saved) flat ranges of an exact fp32 copy: whole where ZeRO-3 keeps the param whole (persistent),
        else this rank's partition; each rank saves its partition."""
        owned = self.owned(param, rank)
        return ((0, param.ds_numel) if getattr(param, "ds_persist", False) else owned), owned


def shard_access_for(engine, shadows: FrozenShadows | None = None) -> TensorAccess:
    """The access class matching what `engine.optimizer` holds (see the table above), with the exact fp32 copies of
    frozen params where a bf16 run keeps them."""
    wrapper = engine.optimizer
    group = getattr(engine, "data_parallel_group", None)
    if any(hasattr(p, "ds_id") for p in engine.module.parameters()):
        return Stage3Slices(wrapper, group, engine.device, shadows)
    if hasattr(wrapper, "single_partition_of_fp32_groups") or hasattr(wrapper, "fp32_groups_flat_partition"):
        return PartitionedMasters(wrapper, group, engine.device, shadows)
    if hasattr(wrapper, "fp32_groups") or hasattr(wrapper, "fp32_groups_flat"):
        return ReplicatedMasters(wrapper, shadows)
    if isinstance(wrapper, torch.optim.Optimizer):
        return ReplicatedAccess(wrapper)
    raise ValueError(f"unsupported DeepSpeed optimizer wrapper {type(wrapper).__name__}: cannot locate masters and states")


@torch.no_grad()
def full_parameters(engine, access: TensorAccess, names: list[str]) -> dict[str, torch.Tensor]:
    """Full fp32 values of the named module parameters on every rank: masters of trainable ones and exact copies of
    frozen ones (one packed collective), the module's own values for other frozen ones (gathered one at a time under
    ZeRO-3)."""
    module: nn.Module = engine.module
    params = dict(module.named_parameters())
    held_fp32 = [n for n in names if params[n].requires_grad or params[n] in getattr(access, "shadows", ())]
    out = dict(zip(held_fp32, access.full_fp32([params[n] for n in held_fp32])))
    for name in names:
        if name in out:
            continue
        p = params[name]
        if hasattr(p, "ds_id") and p.data.numel() != p.ds_numel:  # gathering a persistent param would release it
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.data.detach().float().clone()
        else:
            out[name] = p.data.detach().float().clone()
    return out
