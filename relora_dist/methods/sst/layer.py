"""SST's linear layer (Zhao et al., Sparse Spectral Training, arXiv 2405.15481; the official code could not be
retrieved: docs/METHODS.md names the choices made without it): the weight in its singular basis, every component kept.

    W = U diag(sigma) V^T,   y = x V diag(sigma) U^T + bias,   k = min(m, n) components, from the SVD of W at wrap

sigma trains at every update. Of U and V only r sampled columns (the active slots) train, with SST's enhanced
gradient: G V_S and G^T U_S for G = dL/dW, autograd's gradient without its sigma_S factor, so a component with a
small singular value still moves (`SpectralLinearFunction`).

Storage: `U`, `V` (m x k, n x k) hold every component and are frozen parameters, so every engine places and
checkpoints them like a weight; `U_active`, `V_active` (m x r, n x r) are the trainable copies of the columns listed
in the buffer `active`. The forward assembles U and V with the active copies in their columns, so which components
are active changes nothing of the arithmetic: a resample (the active copies written back, others loaded) leaves the
function bitwise unchanged. What happens between updates (the step's projection, the resample, the re-SVD) is
`events.py`, on the access layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import LLAMA_PROJECTIONS

SAMPLING_RULES = ("sigma", "mixed", "uniform")
FORWARDS = ("factored", "dense", "auto")


def forward_flops(out_features: int, in_features: int, rank: int, tokens: int, forward: str) -> int:
    """FLOPs of one forward + backward of a layer over `tokens` tokens (one micro-batch): `factored` through both bases,
    4 k (m + n) a token, and the active columns' gradients, 2 r (m + n) a token; `dense` with W rebuilt in the forward,
    6 m n a token, plus W itself and G V (2 m n k each) and G^T U_S (2 m n r) once per micro-batch."""
    m, n = out_features, in_features
    k = min(m, n)
    if forward == "factored":
        return tokens * (4 * k * (m + n) + 2 * rank * (m + n))
    return tokens * 6 * m * n + 4 * m * n * k + 2 * m * n * rank


def pick_forward(out_features: int, in_features: int, rank: int, tokens: int, forward: str) -> str:
    """`auto`: the forward with fewer FLOPs at this many tokens per micro-batch (`forward_flops`); else as named."""
    if forward != "auto":
        return forward
    return min(("factored", "dense"), key=lambda f: forward_flops(out_features, in_features, rank, tokens, f))
SST_STATE_SUFFIXES = (".U", ".V", ".sigma", ".U_active", ".V_active", ".active")


def with_active(frozen: torch.Tensor, active_copy: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The whole basis: the frozen columns with the trainable copies of the active ones in place."""
    return frozen.index_copy(1, active, active_copy.to(frozen.dtype))


class SpectralLinearFunction(torch.autograd.Function):
    """y = x V diag(sigma) U^T with U, V assembled from the frozen columns and the active copies. Backward: the input
    gradient and sigma's are autograd's (dsigma_i = u_i^T G v_i); the active columns get the enhanced gradient
    G V_S = dH^T (X V_S) and G^T U_S = X^T (dH U_S), without the sigma_S factor autograd would apply. `dense`: W
    rebuilt in the forward and y = x W^T, the same gradients through G = dH^T X (`forward_flops` says which costs
    less). Under autocast the backward runs in the forward's autocast state (as torch.amp.custom_bwd does)."""

    @staticmethod
    def forward(ctx, x, u, v, sigma, u_active, v_active, active, dense=False):
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.dense = dense
        u_full, v_full = with_active(u, u_active, active), with_active(v, v_active, active)
        # The parameters are saved, not the assembled bases (a copy of U and V per layer until backward), as
        # nn.Linear saves its weight: engines that gather parameters gather them again for backward.
        if dense:
            weight = (u_full * sigma) @ v_full.T
            ctx.save_for_backward(x, u, v, sigma, u_active, v_active, active, weight)
            return x @ weight.T
        projected = x @ v_full  # (..., k): x V
        ctx.save_for_backward(x, u, v, sigma, u_active, v_active, active, projected)
        return (projected * sigma) @ u_full.T

    @staticmethod
    def backward(ctx, grad_out):
        x, u, v, sigma, u_active, v_active, active, saved = ctx.saved_tensors
        u_full, v_full = with_active(u, u_active, active), with_active(v, v_active, active)
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            if ctx.dense:
                grad_x = grad_out @ saved  # dH W
                gradient = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # G = dH^T X
                along_v = gradient @ v_full  # G V
                grad_sigma = (u_full * along_v).sum(0)
                grad_u_active = along_v[:, active]
                grad_v_active = gradient.T @ u_full[:, active]
            else:
                back = grad_out @ u_full  # (..., k): dH U
                grad_x = (back * sigma) @ v_full.T
                back, projected = back.reshape(-1, back.shape[-1]), saved.reshape(-1, saved.shape[-1])
                grad_sigma = (back * projected).sum(0)
                grad_u_active = grad_out.reshape(-1, grad_out.shape[-1]).T @ projected[:, active]
                grad_v_active = x.reshape(-1, x.shape[-1]).T @ back[:, active]
        return (grad_x.to(x.dtype), None, None, grad_sigma.to(sigma.dtype), grad_u_active.to(u_full.dtype),
                grad_v_active.to(v_full.dtype), None, None)


def decompose(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, sigma, V) of `weight` in its dtype, with one sign convention, so that engines whose inputs differ by
    rounding get the same bases: each pair (u_i, v_i) flipped together so that v_i's largest entry is positive, and
    the u_i of a null component (sigma_i <= k eps sigma_max; the clamp at 0 makes them) flipped alone so that its
    largest entry is, since its sign relative to v_i is rounding (flipping it moves W by 2 sigma_i at most)."""
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    v = vh.T
    flip = _largest_entry_negative(v)
    u, v = torch.where(flip, -u, u), torch.where(flip, -v, v)
    null = sigma <= sigma.max() * sigma.numel() * torch.finfo(weight.dtype).eps
    u = torch.where(null & _largest_entry_negative(u), -u, u)
    return u.contiguous(), sigma, v.contiguous()  # LAPACK returns column-major bases


def _largest_entry_negative(basis: torch.Tensor) -> torch.Tensor:
    return basis.gather(0, basis.abs().argmax(0, keepdim=True)) < 0


def sampling_weights(sigma: torch.Tensor, rule: str) -> torch.Tensor:
    """Each component's weight in the draw: `sigma` (the paper: multinomial sampling weighted by the singular values'
    magnitude), `mixed` (half uniform, half by sigma: p_i = (1/k + sigma_i / sum sigma) / 2, one secondary reading of
    the paper, unconfirmed) or `uniform`."""
    weights = sigma.detach().double().clamp(min=0)
    uniform = torch.ones_like(weights)
    if rule == "uniform" or not weights.sum() > 0:
        return uniform
    if rule == "mixed":
        return uniform / weights.numel() + weights / weights.sum()
    return weights


def sample_components(sigma: torch.Tensor, rank: int, generator: torch.Generator, rule: str = "sigma") -> torch.Tensor:
    """r distinct component indices, drawn without replacement with probability proportional to `sampling_weights`,
    sorted. Every rank draws the same from the same generator state and the same (full) sigma."""
    weights = sampling_weights(sigma, rule)
    return torch.multinomial(weights, rank, replacement=False, generator=generator).sort().values


class SSTLinear(nn.Module):
    """See the module docstring. `bias` keeps nn.Linear's name; the export writes U diag(sigma) V^T as `weight`."""

    keep_fp32 = ("U", "V")  # resamples and re-SVDs write them in place: an engine holding them in bf16 keeps fp32 copies

    def __init__(self, linear: nn.Linear, *, rank: int, generator: torch.Generator, rule: str = "sigma", name: str = "",
                 forward: str = "factored"):
        super().__init__()
        m, n = linear.out_features, linear.in_features
        k = min(m, n)
        if not 0 < rank < k:
            raise ValueError(f"sst rank {rank} must be in 1..{k - 1} for {name or 'a layer'} ({m} x {n}: min(m, n) - 1"
                             f" at most) (--rank)")
        weight = linear.weight.detach()
        if weight.is_meta:  # a config check builds on the meta device: shapes only
            u, sigma, v = (torch.empty(shape, dtype=weight.dtype, device="meta") for shape in ((m, k), (k,), (n, k)))
            active = torch.arange(rank)
        else:
            u, sigma, v = decompose(weight.double())
            active = sample_components(sigma, rank, generator, rule)
        dtype = weight.dtype
        self.U = nn.Parameter(u.to(dtype), requires_grad=False)
        self.V = nn.Parameter(v.to(dtype), requires_grad=False)
        self.sigma = nn.Parameter(sigma.to(dtype))
        self.register_buffer("active", active if weight.is_meta else active.to(weight.device))
        self.U_active = nn.Parameter(self.U.detach()[:, active].clone())
        self.V_active = nn.Parameter(self.V.detach()[:, active].clone())
        self.bias = linear.bias
        self.in_features, self.out_features, self.rank = n, m, rank
        self.dense = forward == "dense"  # `auto` is resolved by the caller, which knows the tokens per micro-batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = SpectralLinearFunction.apply(x, self.U, self.V, self.sigma, self.U_active, self.V_active, self.active,
                                         self.dense)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """U diag(sigma) V^T with the active columns in place (the export's `weight`)."""
        with torch.no_grad():
            return spectral_weight(self.U, self.V, self.sigma, self.U_active, self.V_active, self.active)


def spectral_weight(u, v, sigma, u_active, v_active, active) -> torch.Tensor:
    """U diag(sigma) V^T in fp32 from the stored tensors (frozen bases, singular values, active copies and indices)."""
    u, v = with_active(u.float(), u_active, active), with_active(v.float(), v_active, active)
    return (u * sigma.float()) @ v.T


def wrap_sst(model: nn.Module, *, rank: int, generator: torch.Generator, rule: str, forward: str = "factored",
             tokens: int = 0) -> list[SSTLinear]:
    """Every projection of the decoder (`models.LLAMA_PROJECTIONS`) replaced by its SSTLinear, in module order;
    embeddings, norms and the head stay dense. `forward` `auto` picks each layer's forward for `tokens` tokens per
    micro-batch (`pick_forward`)."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS]
    if not targets:
        raise ValueError("sst found no projection to wrap (expected LLaMA's q/k/v/o and gate/up/down projections)")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        chosen = pick_forward(linear.out_features, linear.in_features, rank, tokens, forward)
        setattr(parent, child, SSTLinear(linear, rank=rank, generator=generator, rule=rule, name=name, forward=chosen))
    return sst_layers(model)


def sst_layers(model: nn.Module) -> list[SSTLinear]:
    return [module for module in model.modules() if isinstance(module, SSTLinear)]


def sst_dense_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's weights: every SST layer's U diag(sigma) V^T as its `weight` (computed in fp32, rounded once
    into the bases' dtype); the bases, singular values and active copies dropped."""
    out = {key: value for key, value in state.items() if not key.endswith(SST_STATE_SUFFIXES)}
    for key in state:
        if key.endswith(".sigma"):
            prefix = key[: -len(".sigma")]
            u = state[f"{prefix}.U"]
            out[f"{prefix}.weight"] = spectral_weight(*(state[f"{prefix}.{part}"] for part in
                                                        ("U", "V", "sigma", "U_active", "V_active", "active"))).to(u.dtype)
    return out
