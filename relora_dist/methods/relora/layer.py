"""The ReLoRA linear layer and the in-place model wrapper (PEFT-style module replacement)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...models import SHARED_INPUT_PROJECTIONS
from ...randomness import kaiming_uniform_A
from .config import ReLoRAConfig
from .dropout import lora_input_dropout


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class ReLoRALinear(nn.Module):
    """y = x W^T + bias + scale * (dropout(x) A^T) B^T with W frozen and A (r x in), B (out x r) trainable.

    `weight` and `bias` keep nn.Linear's names, so a merged state dict maps back to HF names as is.
    `relora_name` (the module's dotted name in the unwrapped model) keys its random streams.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        weight: nn.Parameter | None = None,
        bias_param: nn.Parameter | None = None,
        relora_name: str = "",
        seed: int = 0,
        fused: str = "auto",
        dropout_mask: str = "aten",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank <= 0 or rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} is invalid for {relora_name or 'a layer'} ({in_features} -> {out_features}):"
                f" it must be in [1, {min(in_features, out_features)}] (--rank)"
            )
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.relora_name, self.seed = relora_name, seed
        self.fused = fused  # "auto" | "on" | "off": the fused Triton path (relora_dist.kernels)
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5**0.5)
        weight.requires_grad_(False)
        self.weight = weight
        if bias_param is None and bias:
            bias_param = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype))
        self.register_parameter("bias", bias_param)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_mask = dropout_mask  # "aten" | "bits16" (dropout.py); the fused path draws its own
        self.shared_input: SharedLoRAInput | None = None  # set by wrap() with shared_lora_input
        self.shared_index = 0  # this module's place in shared_input.members
        self.reset_lora(restart_index=0)

    @torch.no_grad()
    def reset_lora(self, *, restart_index: int) -> None:
        """A <- Kaiming-uniform from the keyed generator, B <- 0 (never both zero: SPEC section 1)."""
        A = kaiming_uniform_A(tuple(self.lora_A.shape), seed=self.seed, restart_index=restart_index, name=self.relora_name)
        self.lora_A.copy_(A)
        self.lora_B.zero_()

    def _fused_enabled(self, x: torch.Tensor) -> bool:
        if self.fused == "off" or self.weight.requires_grad:
            return False
        if self.fused == "auto":
            return x.is_cuda and _triton_available()
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("fused_kernels=on needs CUDA inputs (or TRITON_INTERPRET=1 on a CPU) (--fused-kernels)")
        return True

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ...kernels import fused_relora_linear

        if torch.is_autocast_enabled(x.device.type):  # the custom op is not autocast: cast like F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return fused_relora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, bias=self.bias, dropout_p=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_enabled(x):
            return self._fused_forward(x)
        t = self.shared_input.down_projection(self, x) if self.shared_input is not None else self.down_projection(x)
        # 2-D, so the in-place add below rebases the GEMM's own output (a view would cost a CopySlices copy in backward).
        out = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        # Linear's backward never reads its output, so the low-rank term goes into it in place; the scale rides on
        # the GEMM (BLAS alpha), never on an out-sized tensor. Under autocast, B is cast as F.linear would cast it.
        out.addmm_(t.reshape(-1, self.rank), self.lora_B.to(out.dtype).t(), alpha=self.scale)
        return out.view(*x.shape[:-1], self.out_features)

    def down_projection(self, x: torch.Tensor) -> torch.Tensor:
        """t = dropout(x) A^T, this module's own mask (r columns)."""
        return F.linear(self._dropped(x), self.lora_A)

    def external_parameters(self) -> list[nn.Parameter]:
        """The group siblings' A this forward may read (access.external_parameters: ZeRO-3 gathers them with ours)."""
        members = self.shared_input.members if self.shared_input is not None else []
        return [m.lora_A for m in members if m is not self]

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return lora_input_dropout(x, self.lora_dropout.p, self.dropout_mask)
        return x

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


class SharedLoRAInput:
    """Sibling projections that read the same x (q/k/v; gate/up) share one dropout of x and one down-projection
    GEMM x [A_1; A_2; ...]^T: one mask for the group where the authors (and PEFT) draw one per module.

    A forward pass calls each member once, in any order: the first computes t for all of them and the others take
    their r columns. The group trusts the model's structure (models.SHARED_INPUT_PROJECTIONS) rather than tensor
    identity, which ZeRO-3 breaks by handing every module its input through a detach() and which a trace could not
    see through. A plain object, not a module: the members stay where they are, with their own parameters and names.
    """

    def __init__(self, members: list[ReLoRALinear]):
        self.members = members
        self._pending: dict[int, torch.Tensor] = {}  # member index -> its columns of t, until it takes them

    def down_projection(self, member: ReLoRALinear, x: torch.Tensor) -> torch.Tensor:
        t = self._pending.pop(member.shared_index, None)
        if t is None or t.shape[:-1] != x.shape[:-1]:  # this member is the pass's first call
            A = torch.cat([m.lora_A for m in self.members])
            columns = F.linear(member._dropped(x), A).split([m.rank for m in self.members], dim=-1)
            self._pending = {i: c for i, c in enumerate(columns) if i != member.shared_index}
            t = columns[member.shared_index]
        return t  # once every member has taken its columns, the group holds no activation


def _share_inputs(replaced: dict[str, ReLoRALinear]) -> None:
    """Group the wrapped siblings that read one input (models.SHARED_INPUT_PROJECTIONS), where two or more are."""
    groups: dict[tuple[str, int], list[ReLoRALinear]] = {}
    for name, layer in replaced.items():
        parent, _, child = name.rpartition(".")
        for g, group in enumerate(SHARED_INPUT_PROJECTIONS):
            if child in group:
                groups.setdefault((parent, g), []).append(layer)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedLoRAInput(members)
            for index, m in enumerate(members):
                m.shared_input, m.shared_index = shared, index


def wrap(model: nn.Module, config: ReLoRAConfig) -> nn.Module:
    """Replace every nn.Linear whose dotted name contains a target substring by a ReLoRALinear, in place.

    W is frozen and shared with the original module (no copy); everything else stays trainable.
    Call it before the model is handed to a distributed backend.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and any(t in name for t in config.target_modules)
    ]
    if not targets:
        raise ValueError(
            f"target modules {list(config.target_modules)} match no nn.Linear in {type(model).__name__}"
            " (--target-modules)"
        )
    replaced = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = ReLoRALinear(
            linear.in_features,
            linear.out_features,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            bias=linear.bias is not None,
            weight=linear.weight,
            bias_param=linear.bias,
            relora_name=name,
            seed=config.seed,
            fused=config.fused_kernels,
            dropout_mask=config.dropout_mask,
        )
        setattr(parent, child, replacement)
        replaced[name] = replacement
    if config.shared_lora_input:
        _share_inputs(replaced)
    return model


def relora_layers(model: nn.Module) -> list[ReLoRALinear]:
    """All ReLoRA layers in a stable order (works through DDP/engine wrappers)."""
    return [m for m in model.modules() if isinstance(m, ReLoRALinear)]


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(stable name, parameter) for every A and B; names are independent of wrappers."""
    out = []
    for layer in relora_layers(model):
        out.append((f"{layer.relora_name}.lora_A", layer.lora_A))
        out.append((f"{layer.relora_name}.lora_B", layer.lora_B))
    return out
