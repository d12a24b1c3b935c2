"""AdamW with a step counter per element, for SwitchLoRA (Zhou & Wang 2024): a switched LoRA vector restarts its
moments and its bias correction while the rest of its matrix goes on.

The official `StepAdamW` (asfsdsf/SwitchLoRA `optimizer.py`) keeps `step` as an (r, 1) tensor for A and (1, r) for B
and broadcasts the bias corrections. Here the counter has the parameter's own shape (`vector_step`; the elements of
one vector share one value): the state is element-wise, so every engine shards, partitions and checkpoints it as it
does `exp_avg`, and the method zeroes a vector's counter through the same access layer as its moments. It costs one
fp32 per LoRA element.

The update is torch's single-tensor AdamW (decoupled weight decay before the update, eps after the bias-corrected
square root) with per-element step sizes: each distinct counter value's factors are computed as torch computes its
scalar ones (Python floats, then float32), so with every counter equal the update is `torch.optim.AdamW`'s bit for
bit. Groups without `vector_steps` are plain AdamW with one scalar step.
"""

from __future__ import annotations

import torch

from .closure import evaluate_closure


class VectorStepAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "vector_steps": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, self.state[param], group)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        key = "vector_step" if group["vector_steps"] else "step"
        if key not in state:
            state[key] = torch.zeros_like(param, dtype=torch.float32) if group["vector_steps"] else torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        steps, exp_avg, exp_avg_sq = state[key], state["exp_avg"], state["exp_avg_sq"]
        steps += 1
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if not group["vector_steps"]:
            t = steps.item()
            denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**t)))
            return
        # Per element: the factors of each distinct counter value, as torch's scalar path computes them.
        local = steps.to_local() if hasattr(steps, "to_local") else steps
        values, index = torch.unique(local, return_inverse=True)
        counts = values.tolist()
        step_size = torch.tensor([-(lr / (1 - beta1**t)) for t in counts], dtype=param.dtype, device=local.device)[index]
        bias2 = torch.tensor([(1 - beta2**t) ** 0.5 for t in counts], dtype=param.dtype, device=local.device)[index]
        if local is not steps:  # DTensor states (FSDP2): the factors are this rank's elements
            step_size, bias2 = (type(steps).from_local(x, steps.device_mesh, steps.placements, run_check=False,
                                                       shape=steps.shape, stride=steps.stride())
                                for x in (step_size, bias2))
        denom = (exp_avg_sq.sqrt() / bias2).add_(eps)
        param.add_((exp_avg * step_size) / denom)  # addcdiv's order: (value * t1) / t2
