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
import torch.distributed as dist

from ...ranges import assemble_ranges
from ..closure import evaluate_closure


class VectorStepAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "vector_steps": False})

    # -- DeepSpeed ZeRO-1/2/3: the counters are element-wise, but its universal checkpoint carries exp_avg and
    # exp_avg_sq only; the engine saves these records beside it and hands them back at another world size.
    def locate_partitions(self, partitions: dict[int, list], group=None) -> None:
        """Which range of which parameter each flat tensor holds (`access.FlatPartition`s), and the process group."""
        self._partitions, self._partition_rank = partitions, dist.get_rank(group) if dist.is_initialized() else 0

    @property
    def state_reshardable(self) -> bool:
        return not getattr(self, "_partitions", None)

    def _vector_flats(self):
        for group in self.param_groups:
            for flat in group["params"] if group["vector_steps"] else ():
                if id(flat) in self._partitions:
                    yield flat, self._partitions[id(flat)]

    def portable_state(self) -> dict:
        """Per parameter this rank holds elements of: its range [lo, hi) and their step counters."""
        out = {}
        for flat, partitions in self._vector_flats():
            steps = self.state[flat].get("vector_step") if flat in self.state else None
            for part in partitions if steps is not None else ():
                lo, hi = part.ranges[self._partition_rank]
                if hi > lo:
                    out[part.param] = {"lo": lo, "vector_step": steps[part.offset : part.offset + hi - lo].clone()}
        return out

    def load_portable_state(self, records: list[dict]) -> list:
        """Every flat tensor's counters from the records of all saved ranks (DeepSpeed restored the moments)."""
        for flat, partitions in self._vector_flats():
            steps = torch.zeros_like(flat, dtype=torch.float32)
            for part in partitions:
                lo, hi = part.ranges[self._partition_rank]
                if hi == lo:
                    continue
                whole = assemble_ranges(((r[part.param]["lo"], r[part.param]["vector_step"]) for r in records
                                         if part.param in r), part.shape.numel(), what="optimizer step counters of a parameter")
                steps[part.offset : part.offset + hi - lo] = whole[lo:hi].to(steps.device)
            self.state[flat]["vector_step"] = steps
        return []  # the moments DeepSpeed loaded stay as they are

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
