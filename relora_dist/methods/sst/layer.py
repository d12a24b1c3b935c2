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
function bitwise unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def with_active(frozen: torch.Tensor, active_copy: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The whole basis: the frozen columns with the trainable copies of the active ones in place."""
    return frozen.index_copy(1, active, active_copy)


class SpectralLinearFunction(torch.autograd.Function):
    """y = x V diag(sigma) U^T with U, V assembled from the frozen columns and the active copies. Backward: the input
    gradient and sigma's are autograd's (dsigma_i = u_i^T G v_i); the active columns get the enhanced gradient
    G V_S = dH^T (X V_S) and G^T U_S = X^T (dH U_S), without the sigma_S factor autograd would apply."""

    @staticmethod
    def forward(ctx, x, u, v, sigma, u_active, v_active, active):
        u_full, v_full = with_active(u, u_active, active), with_active(v, v_active, active)
        projected = x @ v_full  # (..., k): x V
        ctx.save_for_backward(x, u_full, v_full, sigma, active, projected)
        return (projected * sigma) @ u_full.T

    @staticmethod
    def backward(ctx, grad_out):
        x, u_full, v_full, sigma, active, projected = ctx.saved_tensors
        back = grad_out @ u_full  # (..., k): dH U
        grad_x = (back * sigma) @ v_full.T
        back, projected = back.reshape(-1, back.shape[-1]), projected.reshape(-1, projected.shape[-1])
        grad_sigma = (back * projected).sum(0)
        grad_u_active = grad_out.reshape(-1, grad_out.shape[-1]).T @ projected[:, active]
        grad_v_active = x.reshape(-1, x.shape[-1]).T @ back[:, active]
        return grad_x, None, None, grad_sigma, grad_u_active, grad_v_active, None


def sample_components(sigma: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """r distinct component indices, drawn without replacement with probability proportional to the singular values
    (the paper: multinomial sampling weighted by their magnitude), sorted. Every rank draws the same from the same
    generator state and the same (full) sigma."""
    weights = sigma.detach().double().clamp(min=0)
    if not weights.sum() > 0:
        weights = torch.ones_like(weights)
    return torch.multinomial(weights, rank, replacement=False, generator=generator).sort().values


class SSTLinear(nn.Module):
    """See the module docstring. `bias` keeps nn.Linear's name; the export writes U diag(sigma) V^T as `weight`."""

    def __init__(self, linear: nn.Linear, *, rank: int, generator: torch.Generator):
        super().__init__()
        m, n = linear.out_features, linear.in_features
        k = min(m, n)
        if not 0 < rank < k:
            raise ValueError(f"SST rank {rank} must be in 1..{k - 1} for a {m} x {n} weight (min(m, n) - 1 at most)")
        u, sigma, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        dtype = linear.weight.dtype
        self.U = nn.Parameter(u.to(dtype), requires_grad=False)
        self.V = nn.Parameter(vh.T.contiguous().to(dtype), requires_grad=False)
        self.sigma = nn.Parameter(sigma.to(dtype))
        self.register_buffer("active", sample_components(sigma, rank, generator))
        self.U_active = nn.Parameter(self.U[:, self.active].clone())
        self.V_active = nn.Parameter(self.V[:, self.active].clone())
        self.bias = linear.bias
        self.in_features, self.out_features, self.rank = n, m, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = SpectralLinearFunction.apply(x, self.U, self.V, self.sigma, self.U_active, self.V_active, self.active)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """U diag(sigma) V^T with the active columns in place (the export's `weight`)."""
        with torch.no_grad():
            u, v = with_active(self.U, self.U_active, self.active), with_active(self.V, self.V_active, self.active)
            return (u * self.sigma) @ v.T

    @torch.no_grad()
    def resample(self, generator: torch.Generator) -> None:
        """Write the active copies back into their columns, draw r components from sigma and load theirs: an exact
        copy both ways, the function unchanged bit for bit. (The active slots' optimizer moments are the method's to
        reset.)"""
        self.U.index_copy_(1, self.active, self.U_active)
        self.V.index_copy_(1, self.active, self.V_active)
        self.active.copy_(sample_components(self.sigma, self.rank, generator))
        self.U_active.copy_(self.U[:, self.active])
        self.V_active.copy_(self.V[:, self.active])

    @torch.no_grad()
    def after_step(self) -> None:
        """After every optimizer step: sigma clamped at 0, the active columns back to unit length (the magnitude is
        sigma's alone)."""
        self.sigma.clamp_(min=0)
        for active in (self.U_active, self.V_active):
            active.div_(active.norm(dim=0, keepdim=True).clamp(min=torch.finfo(active.dtype).tiny))

    @torch.no_grad()
    def redecompose(self) -> None:
        """The round's re-SVD: U diag(sigma) V^T decomposed again in fp64, so U and V are orthonormal again and the
        function is unchanged (to rounding); the active slots keep their indices, now meaning the new components."""
        u, sigma, vh = torch.linalg.svd(self.dense_weight().double(), full_matrices=False)
        self.U.copy_(u)
        self.V.copy_(vh.T)
        self.sigma.copy_(sigma)
        self.U_active.copy_(self.U[:, self.active])
        self.V_active.copy_(self.V[:, self.active])
