"""SwitchLoRA's linear layer (Zhou & Wang 2024, asfsdsf/SwitchLoRA `switch_lora.py`): a frozen W plus a trainable
s·B@A whose vectors are swapped, a few per update, with vectors parked in candidate pools.

    y = x W^T + bias + s · (x A_eff^T) B_eff^T,   s = alpha / r (alpha = 1 in the official code)

A_eff is A with its frozen rows detached, B_eff is B with its frozen columns detached: a vector whose counterpart
was just switched gets no gradient for `freeze_steps` updates (the official code zeroes those gradients after the
backward; a forward mask does it before the engine reduces anything, see `switching.py`).

Candidate pools: c = min(m, n) vectors for A (c x n) and for B (c x m), drawn U(+-bound) with the official bounds,
frozen parameters of the layer (so every engine checkpoints and places them like W). A holds pool slots
c-r .. c-1, B the same slots rotated by r/2; W starts as W_init - s·B@A, so the model computes what it did
before wrapping. The control state (selected slots, pointers, freeze counters) is in integer buffers, the same on
every rank, and checkpointed with the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...randomness import keyed_generator


def init_bounds(in_features: int, out_features: int, rank: int) -> tuple[float, float]:
    """The official U(+-bound) bounds of A and B (`lora_utils.get_init_lora_bound`): the std of B@A x stays that of a
    Kaiming init, with A·dB and dA·B of one size."""
    m, n, r = out_features, in_features, rank
    gain = nn.init.calculate_gain("leaky_relu", param=math.sqrt(5))
    std_a = ((m**0.5 * r) / (n ** (3.0 / 2))) ** (1.0 / 4) * gain**0.5
    std_b = (r / (m * n) ** 0.5) ** (1.0 / 4) * gain**0.5
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


class CandidatePools(nn.Module):
    """A layer's candidate vectors for A (c x n) and B (c x m): frozen parameters that only a switch reads, in a module
    of their own that no forward calls (`dormant`: FSDP2 shards it as its own unit and ZeRO-3 never gathers it for a
    forward; the switch fetches the slots it takes)."""

    dormant = True
    keep_fp32 = ("candidates_A", "candidates_B")  # parked vectors return to A and B: kept exact (access layer)

    def __init__(self, candidates_a: torch.Tensor, candidates_b: torch.Tensor):
        super().__init__()
        self.candidates_A = nn.Parameter(candidates_a, requires_grad=False)
        self.candidates_B = nn.Parameter(candidates_b, requires_grad=False)


class SwitchLoRALinear(nn.Module):
    """See the module docstring. `weight` and `bias` keep nn.Linear's names (the export maps back as is)."""

    keep_fp32 = ("weight",)  # every switch folds into W: an engine holding it in bf16 keeps an fp32 copy

    def __init__(self, linear: nn.Linear, *, rank: int, alpha: float, name: str, seed: int):
        super().__init__()
        m, n = linear.out_features, linear.in_features
        if rank <= 0 or rank > min(m, n):
            raise ValueError(f"rank {rank} is invalid for {name} ({n} -> {m}): it must be in [1, {min(m, n)}] (--rank)")
        self.in_features, self.out_features, self.rank = n, m, rank
        self.scale = alpha / rank
        self.switch_name = name
        self.pool_size = min(m, n)
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        c = self.pool_size
        bound_a, bound_b = init_bounds(n, m, rank)
        draws = ((n, bound_a, "switch/candidates_A"), (m, bound_b, "switch/candidates_B"))
        if self.weight.is_meta:  # a config check builds on the meta device: no values to draw
            pools = [torch.empty(c, size, device="meta") for size, _, _ in draws]
        else:  # keyed streams: the same pools on every rank and world size
            pools = [torch.empty(c, size).uniform_(-bound, bound, generator=keyed_generator(seed, 0, name, key))
                     for size, bound, key in draws]
        self.pools = CandidatePools(pools[0].to(**factory), pools[1].to(**factory))
        slots = torch.arange(c - rank, c)
        selected_b = slots[(torch.arange(rank) - rank // 2) % rank]  # the same slots, rotated by r/2
        self.register_buffer("selected_A", slots.clone())
        self.register_buffer("selected_B", selected_b)
        self.register_buffer("pointers", torch.tensor([0, rank // 2]))  # next A row, next B column to switch
        self.register_buffer("freeze_A", torch.zeros(rank, dtype=torch.long))  # updates A's rows stay frozen
        self.register_buffer("freeze_B", torch.zeros(rank, dtype=torch.long))  # updates B's columns stay frozen
        self.lora_A = nn.Parameter(self.candidates_A.detach()[slots].clone())
        self.lora_B = nn.Parameter(self.candidates_B.detach()[selected_b].T.contiguous())
        with torch.no_grad():  # function preserving: W_init - s·B@A (official layer2lora)
            self.weight.sub_((self.lora_B @ self.lora_A) * self.scale)

    @property
    def candidates_A(self) -> nn.Parameter:
        return self.pools.candidates_A

    @property
    def candidates_B(self) -> nn.Parameter:
        return self.pools.candidates_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = torch.where((self.freeze_A > 0).unsqueeze(1), self.lora_A.detach(), self.lora_A)
        B = torch.where((self.freeze_B > 0).unsqueeze(0), self.lora_B.detach(), self.lora_B)
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(x, A), B) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, pool={self.pool_size}, scale={self.scale:g}"


def wrap_switchlora(model: nn.Module, *, target_modules, rank: int, alpha: float, seed: int) -> list[SwitchLoRALinear]:
    """Replace every nn.Linear whose dotted name contains a target substring by a SwitchLoRALinear, in place."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and any(t in name for t in target_modules)]
    if not targets:
        raise ValueError(f"target modules {list(target_modules)} match no nn.Linear in {type(model).__name__}"
                         " (--switchlora-target-modules)")
    layers = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = SwitchLoRALinear(linear, rank=rank, alpha=alpha, name=name, seed=seed)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def switch_layers(model: nn.Module) -> list[SwitchLoRALinear]:
    """All SwitchLoRA layers in a stable order (works through engine wrappers)."""
    return [m for m in model.modules() if isinstance(m, SwitchLoRALinear)]


SWITCH_STATE_SUFFIXES = (".candidates_A", ".candidates_B", ".lora_A", ".lora_B", ".selected_A", ".selected_B",
                         ".pointers", ".freeze_A", ".freeze_B")


def switchlora_dense_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The plain model's weights: W + s·B@A (fp32, rounded once into W's dtype); pools and control state dropped."""
    out = {k: v for k, v in state.items() if not k.endswith(SWITCH_STATE_SUFFIXES)}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            weight = state[f"{prefix}.weight"]
            merged = weight.float() + (state[f"{prefix}.lora_B"].float() @ state[key].float()) * scale
            out[f"{prefix}.weight"] = merged.to(weight.dtype)
    return out
