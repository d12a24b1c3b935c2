"""SST, Sparse Spectral Training (Zhao et al., arXiv 2405.15481, ICML 2025): every projection of the decoder trained
in its singular basis, W = U diag(sigma) V^T from the SVD of its initial weight (`layer.py`). sigma trains at every
update and is clamped at 0; r sampled components (the active slots) train their singular vectors with the enhanced
gradient and are renormalised after every update; every iteration (T3 updates) the active components are resampled,
their moments zeroed and the learning rate restarts on a jagged schedule; every round (T2 iterations) the weights
are decomposed again. Between updates, everything acts through the access layer (`events.py`).

The knobs live in the `sst:` section (--rank, --sst-iteration-steps, --sst-round-iterations, --sst-sampling,
--sst-restart-warmup, --sst-forward). The official code could not be retrieved; docs/METHODS.md says which choices that left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...perf.accounting import CostTraits
from ...randomness import keyed_generator
from ..base import Event, Method, register_method
from ..lr_schedule import jagged_cosine
from .events import project, redecompose, resample
from .layer import FORWARDS, SAMPLING_RULES, sst_dense_state, sst_layers, wrap_sst


@dataclass
class SSTSettings:
    """SST's layers and schedule."""

    rank: int = 64
    """r: the singular-vector pairs of each layer that train at once (the paper's LLaMA-130M uses 64, 1.3B 128)."""
    iteration_steps: int = 200
    """T3: updates between resamples of the active components (the paper's value for LLaMA was not retrieved)."""
    round_iterations: int | None = None
    """T2: iterations between re-SVDs; default ceil(k / r) for the largest k = min(m, n) of the wrapped layers (a
    round passes once over as many components as a layer has)."""
    sampling: str = "sigma"
    """sigma: r components without replacement, each drawn with probability proportional to its singular value (the
    paper's multinomial sampling); mixed: half uniform, half by sigma (one secondary reading, unconfirmed); uniform."""
    restart_warmup: int = 10
    """Updates of the LR's linear re-warm-up after every resample (jagged schedule; 0: no restarts)."""
    forward: str = "factored"
    """factored: (x V) diag(sigma) U^T, what relora_dist.perf counts; dense: W = U diag(sigma) V^T rebuilt in every
    forward and y = x W^T; auto: per layer, the one with fewer FLOPs at --micro-batch-size x --seq-len tokens
    (benchmarks/sst_forward.py times both)."""

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"sst rank must be > 0, got {self.rank} (--rank)")
        if self.iteration_steps < 1:
            raise ValueError(f"sst iteration_steps must be >= 1, got {self.iteration_steps} (--sst-iteration-steps)")
        if self.round_iterations is not None and self.round_iterations < 1:
            raise ValueError(f"sst round_iterations must be >= 1, got {self.round_iterations} (--sst-round-iterations)")
        if self.sampling not in SAMPLING_RULES:
            raise ValueError(f"sst sampling must be one of {', '.join(SAMPLING_RULES)}, got {self.sampling!r}"
                             f" (--sst-sampling)")
        if self.forward not in FORWARDS:
            raise ValueError(f"sst forward must be one of {', '.join(FORWARDS)}, got {self.forward!r} (--sst-forward)")
        if not 0 <= self.restart_warmup < self.iteration_steps:
            raise ValueError(f"sst restart_warmup {self.restart_warmup} must be in [0, {self.iteration_steps - 1}]: an"
                             f" iteration of {self.iteration_steps} updates shorter than its warm-up (--sst-restart-warmup)")


@register_method
class SST(Method):
    name = "sst"
    description = "SST: every projection in its singular basis, sampled singular vectors, re-SVD each round (Zhao et al. 2024)"
    config_section = "sst"
    config_class = SSTSettings
    # Each projection in its singular basis (no dense W), the bases written in place at resamples and re-SVDs.
    cost_traits = CostTraits(spectral_basis=True, rewrites_frozen=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        # One stream for every resample, identical on every rank (checkpointed); the wrap's draw has its own.
        self.generator = keyed_generator(cfg.train.seed, 0, "sst", "resample")
        self.round_iterations = self.settings.round_iterations

    # -- the model ------------------------------------------------------------------------------------
    def prepare_model(self, model, step):
        s = self.settings
        layers = wrap_sst(model, rank=s.rank, generator=keyed_generator(self.cfg.train.seed, 0, "sst", "wrap"),
                          rule=s.sampling, forward=s.forward,
                          tokens=self.cfg.train.micro_batch_size * self.cfg.data.seq_len)
        if self.round_iterations is None:
            self.round_iterations = math.ceil(max(min(layer.in_features, layer.out_features) for layer in layers) / s.rank)
        return model

    def resolved_rank(self, config):
        return self.settings.rank

    def lr(self, step):
        o, s = self.cfg.optim, self.settings
        return o.lr * jagged_cosine(step, total_steps=self.total_steps, first_warmup=o.warmup_steps,
                                    restart_warmup=s.restart_warmup, cycle_length=s.iteration_steps if s.restart_warmup else None,
                                    min_lr_ratio=o.min_lr_ratio)

    # -- events ---------------------------------------------------------------------------------------
    def after_update(self, step):
        events = [Event("project", step, routine=True)]  # after every update, the last one too (the export reads it)
        t3 = self.settings.iteration_steps
        if step < self.total_steps and step % t3 == 0:
            iteration = step // t3
            if iteration % self.round_iterations == 0:
                events.append(Event("resvd", iteration // self.round_iterations))
            events.append(Event("resample", iteration))
        return events

    def apply(self, event, model, access):
        layers = sst_layers(model)
        if event.name == "project":
            project(layers, access)
            return f"projection after update {event.index}"
        if event.name == "resample":
            resample(layers, access, self.generator, self.settings.sampling)
            return f"resample {event.index}: {self.settings.rank} components of each of {len(layers)} layers"
        if event.name == "resvd":
            redecompose(layers, access)
            return f"re-SVD {event.index} of {len(layers)} layers"
        return super().apply(event, model, access)

    def log_fields(self, step):
        return {"sst_iteration": step // self.settings.iteration_steps}

    def periodic_events(self):
        t3 = self.settings.iteration_steps
        return [(Event("project", 1, routine=True), 1), (Event("resample", 1), t3),
                (Event("resvd", 1), t3 * (self.round_iterations or 1))]

    # -- checkpoints and export -----------------------------------------------------------------------
    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def dense_state(self, state):
        return sst_dense_state(state)
