"""The ReLoRA-family controller that drives the warm-start switch, merges,
resets and LR restarts (used by the lora, lora_ws and relora methods).

One counter (successful optimizer updates) decides everything, so a skipped NaN step can never
desynchronise merges from LR restarts (the reference code's B10).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lr_schedule import jagged_cosine
from .config import ReLoRAConfig

# Phase layouts of the ReLoRA paper's runs: when the low-rank phase starts, and whether it restarts.
#   full / control: never low-rank; lora: low-rank from update 0; lora_ws: after the warm start;
#   relora: after the warm start (0: from scratch), with merges, resets and LR restarts.
LAYOUTS = ("full", "relora", "lora", "lora_ws", "control")


@dataclass
class Actions:
    """What the training loop must do after the update just taken."""

    wrap: bool = False  # full-rank warm start finished: wrap the model, rebuild the optimizer
    merge: bool = False
    reset: bool = False
    merge_index: int = 0  # keys the re-init draw (0 is the draw at wrap time)
    reset_index: int = 0  # keys the random prune masks


@dataclass
class ReLoRAController:
    """Phase, LR factor, merges and resets of one run of layout `method` (see LAYOUTS), from one counter of
    successful updates. `lr_factor(step)` and `actions_after(done)` are pure; `after_update()` drives them
    update by update with the controller's own counter.

    Phase 1 (full rank, `warm_start_steps` updates for relora/lora_ws) follows a warm-up + cosine laid
    out over the whole run, as the reference ran it; phase 2 starts a new schedule over the remaining
    updates (with restarts for relora).
    """

    method: str
    total_steps: int
    relora: ReLoRAConfig
    warmup_steps: int
    min_lr_ratio: float = 0.1
    step: int = 0
    merges: int = 0
    resets: int = 0

    def __post_init__(self) -> None:
        if self.method not in LAYOUTS:
            raise ValueError(f"unknown method {self.method!r} for the ReLoRA schedule; choose one of {', '.join(LAYOUTS)}")
        if self.total_steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.total_steps} (--steps)")
        if self.phase2_start >= self.total_steps and self.method in ("relora", "lora_ws"):
            raise ValueError(
                f"warm start ({self.relora.warm_start_steps} updates) must end before the run ({self.total_steps})"
                " (--warm-start-steps, --steps)"
            )
        shortest_phase = self.total_steps - self.phase2_start or self.total_steps
        if not 0 <= self.warmup_steps <= shortest_phase:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be in [0, {shortest_phase}] (--warmup-steps)")

    @property
    def phase2_start(self) -> int:
        """First update taken with the low-rank model (== total_steps for full-rank methods)."""
        if self.method in ("full", "control"):
            return self.total_steps
        if self.method == "lora":
            return 0
        return self.relora.warm_start_steps

    @property
    def low_rank(self) -> bool:
        """Whether the next update is taken with the wrapped model."""
        return self.step >= self.phase2_start

    @property
    def jagged(self) -> bool:
        """LR restarts (relora with the jagged schedule on)."""
        return self.method == "relora" and self.relora.jagged_schedule

    def lr_factor(self, step: int | None = None) -> float:
        """LR multiplier for update `step` (default: the next one)."""
        step = self.step if step is None else step
        if step < self.phase2_start:
            return jagged_cosine(step, total_steps=self.total_steps, first_warmup=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)
        return jagged_cosine(
            step - self.phase2_start,
            total_steps=self.total_steps - self.phase2_start,
            first_warmup=self.warmup_steps,
            restart_warmup=self.relora.restart_warmup_steps if self.jagged else 0,
            cycle_length=self.relora.reset_period if self.jagged else None,
            min_lr_ratio=self.min_lr_ratio,
        )

    def _cycles(self, done: int, period: int) -> int:
        """Multiples of `period` in (0, t], t = done - phase2_start: the merges (resets) once update `done` is taken."""
        t = done - self.phase2_start
        return t // period if self.method == "relora" and t > 0 else 0

    def actions_after(self, done: int) -> Actions:
        """What to do right after update `done` (0-based); merge/reset indices count those events so far."""
        t = done - self.phase2_start  # right after the update taken at LR factor 0 (t = k * cycle)
        actions = Actions(wrap=done + 1 == self.phase2_start and self.method in ("relora", "lora_ws"))
        if self.method == "relora" and t > 0:
            actions.merge = self.relora.restarts and t % self.relora.merge_every == 0
            actions.reset = self.relora.optimizer_reset and t % self.relora.reset_period == 0
        actions.merge_index, actions.reset_index = self.counts_after(done)
        return actions

    def counts_after(self, done: int) -> tuple[int, int]:
        """(merges, resets) once update `done` (0-based) is taken."""
        r = self.relora
        return (self._cycles(done, r.merge_every) if r.restarts else 0,
                self._cycles(done, r.reset_period) if r.optimizer_reset else 0)

    def after_update(self) -> Actions:
        """Call once per successful optimizer update (never for a skipped one)."""
        actions = self.actions_after(self.step)
        self.step += 1
        self.merges, self.resets = actions.merge_index, actions.reset_index
        return actions

    def state_dict(self) -> dict:
        return {"step": self.step, "merges": self.merges, "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.merges, self.resets = int(state["step"]), int(state["merges"]), int(state["resets"])
