"""Fault injection for testing the restart path on a real cluster (and in our tests).

RELORA_INJECT_FAULTS holds `;`-separated entries `KIND:ATTEMPTS[:rank=R]`. ATTEMPTS are 1-based update
attempts (a skipped update counts, so an injected NaN does not repeat forever): `5`, `5-7` or `5,9`.
Without `rank=` an entry fires on every rank. Faults fire in the first launch only
(TORCHELASTIC_RESTART_COUNT unset or 0), so `torchrun --max-restarts N ... --resume auto` can recover.

Kinds (`kill`, `kill_backward`, `kill_checkpoint`, `hang`, `nan_loss`, `inf_grad`, `desync`): docs/FAULT_TOLERANCE.md.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

ENV = "RELORA_INJECT_FAULTS"
KINDS = ("kill", "kill_backward", "kill_checkpoint", "hang", "nan_loss", "inf_grad", "desync")


@dataclass(frozen=True)
class Fault:
    kind: str
    attempts: frozenset[int]
    rank: int | None = None


def _attempts(text: str) -> frozenset[int]:
    out = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return frozenset(out)


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, rest = entry.partition(":")
        attempts, _, rank = rest.partition(":")
        if kind not in KINDS or not attempts or (rank and not rank.startswith("rank=")):
            raise ValueError(f"{ENV}: cannot parse {entry!r}; expected KIND:ATTEMPTS[:rank=R] with KIND one of {', '.join(KINDS)}")
        try:
            faults.append(Fault(kind, _attempts(attempts), int(rank[5:]) if rank else None))
        except ValueError:
            raise ValueError(f"{ENV}: bad numbers in {entry!r}") from None
    return faults


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; backward sends inf (or dies, for kill_backward) instead of the gradient."""

    @staticmethod
    def forward(ctx, loss, die):
        ctx.die = die
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        if ctx.die:
            _die()
        return grad * float("inf"), None


class FaultPlan:
    """The faults of this rank (none unless RELORA_INJECT_FAULTS is set)."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]

    @classmethod
    def from_env(cls, rank: int) -> "FaultPlan":
        faults = parse_faults(os.environ.get(ENV, ""))
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        return cls([] if restarted else faults, rank)

    def _fires(self, kind: str, attempt: int) -> bool:
        return any(f.kind == kind and attempt in f.attempts for f in self.faults)

    def before_update(self, attempt: int) -> None:
        if self._fires("kill", attempt):
            _die()
        while self._fires("hang", attempt):
            time.sleep(1.0)

    def desync(self, model: torch.nn.Module, attempt: int) -> None:
        """`desync`: the model's last persistent buffer (a method's control state, e.g. SwitchLoRA's freeze counters)
        moves on this rank only, by one ulp if floating, by 2^20 if integer (a counter the method counts down would
        otherwise heal), for --check-replicas to catch."""
        if not self._fires("desync", attempt):  # runs before every update: nothing else unless it fires
            return
        buffers = [b for m in model.modules() for name, b in m._buffers.items()
                   if b is not None and name not in m._non_persistent_buffers_set]
        if buffers:
            with torch.no_grad():
                last = buffers[-1].view(-1)
                if last.is_floating_point():
                    last[0] = torch.nextafter(last[0], last[0] + 1)
                else:
                    last[0] += 1 << 20

    def corrupt_loss(self, loss: torch.Tensor, attempt: int) -> torch.Tensor:
        """Applied to the first micro-batch's loss of an attempt."""
        if self._fires("nan_loss", attempt):
            loss = loss * float("nan")
        if self._fires("inf_grad", attempt) or self._fires("kill_backward", attempt):
            loss = _PoisonGradient.apply(loss, self._fires("kill_backward", attempt))
        return loss

    def checkpoint_written(self, step: int) -> None:
        if self._fires("kill_checkpoint", step):
            _die()
