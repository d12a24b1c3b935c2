"""Engine labels: the names the tests, benchmarks and tools give an engine setup, defined once.

`zeroN` is DeepSpeed at ZeRO stage N; the others are registry names (`backends._REGISTRY`). A label gives the
relora-train flags that select it (DeepSpeed through the repository's `launch/configs/zeroN.json`), the launcher
that starts its ranks, and the minimal `build_backend` options the in-process harnesses use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The repository's DeepSpeed configs (a source checkout: tests, benchmarks, launch/).
CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


@dataclass(frozen=True)
class EngineLabel:
    name: str
    backend: str
    stage: int | None = None  # DeepSpeed's ZeRO stage

    @property
    def launcher(self) -> str:
        return "deepspeed" if self.backend == "deepspeed" else "torchrun"

    def train_flags(self, configs: Path = CONFIGS) -> list[str]:
        """relora-train's flags for this engine."""
        if self.backend == "deepspeed":
            return ["--deepspeed", str(configs / f"zero{self.stage}.json")]
        return ["--backend", self.backend]

    def backend_options(self) -> dict:
        """`build_backend` options: DeepSpeed with only the stage set (the run's own settings fill the rest)."""
        return {"config": {"zero_optimization": {"stage": self.stage}}} if self.backend == "deepspeed" else {}


ENGINE_LABELS: dict[str, EngineLabel] = {label.name: label for label in (
    EngineLabel("ddp", "ddp"),
    *(EngineLabel(f"zero{stage}", "deepspeed", stage) for stage in range(4)),
    EngineLabel("fsdp2", "fsdp2"),
    EngineLabel("fairscale", "fairscale"),
    EngineLabel("zero_redundancy", "zero_redundancy"),
)}


def engine_label(name: str) -> EngineLabel:
    if name not in ENGINE_LABELS:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_LABELS)} (zeroN: DeepSpeed stage N)")
    return ENGINE_LABELS[name]
