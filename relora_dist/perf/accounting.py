"""Exact per-token FLOPs, static bytes and gradient traffic of a LLaMA config, by the cost traits a training method
declares (`CostTraits`: relora_dist.methods.Method.cost_traits). Nothing here names a method: a new method declares its
traits and is counted by them.

These are the identities the throughput harness reports and the performance model builds on
(SPEC section 4, research/perf_model.md section 2). They are tested against FlopCounterMode and
real optimizer state (tests/test_perf_accounting.py).
- N_lin: the projections the low-rank factors wrap (frozen W); N_other: projections left full rank; N_head; N_emb;
  N_norm; N_lora = sum over wrapped projections of r(in + out).
- Executed FLOPs per token: 6 per trained weight, 4 per frozen one (no dW), none for a dense projection the factors
  replace: full rank 6(N_lin + N_other + N_head); frozen W plus factors (ReLoRA) 4 N_lin + 6 N_lora + 6(N_other +
  N_head). Attention comes on top as causal flash attention executes it: 2 s h per layer forward, 5 s h backward
  (recompute included); FlopCounterMode does not see the CPU SDPA kernel.
- Factors replacing the dense projections (CoLA's bottleneck sigma(x A) B, CR-Net's differences): nothing frozen,
  N_lora in place of N_lin, executed 6 N_lora + 6(N_other + N_head). Recomputing every layer's forward in backward
  adds 2 per layer weight (8 N_lora, 8 N_other) and the attention products' forward once more (9 s h per layer); cut
  at the factors' r-wide activations (CoLA-M) the last layer's final factor needs none (2 r h less).
- A dense first layer (CR-Net): layer 0 keeps its dense projections (N_other), the later layers hold the factors,
  with a carried output one β per projection (counted with the norms); N_lin is then the dense projections the
  factors replaced, for reference only.
- MFU convention (PaLM / nanoGPT / torchtitan): 6 N + 12 L h s FLOPs per token, N = the full-rank model's
  parameters (a model whose factors replace its dense projections: its own, smaller model). HFU uses the executed
  FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from ..models import LLAMA_PROJECTIONS as PROJECTIONS


@dataclass(frozen=True)
class CostTraits:
    """What a training method's parameters, FLOPs and bytes cost, by trait (each named after the cost it causes).
    Every figure in relora_dist.perf reads these and nothing else of a method; the default is full-rank training."""

    frozen_weights: bool = False
    """The wrapped dense projections are held but frozen: no dW GEMM (4 FLOPs per weight and token, not 6), no
    gradient, no optimizer state."""
    low_rank_factors: bool = False
    """Trainable rank-r factors A (in x r), B (r x out) per wrapped projection (N_lora): their small GEMMs, costed
    memory- or compute-bound, and an r-wide intermediate per projection kept for backward."""
    replaces_dense: bool = False
    """The factors are the projections (a bottleneck): no dense W is held or run for a wrapped projection, and MFU
    counts this model's own parameters."""
    factor_activation: bool = False
    """σ between A and B (σ(x A) B): backward keeps σ(x A) as well, a second r-wide tensor per projection."""
    projected_state: bool = False
    """The optimizer keeps the projections' Adam moments in a rank-r projection of their gradients, plus a projector
    per matrix, in place of full moments."""
    candidate_pools: bool = False
    """Frozen candidate vectors held beside the factors (N_pools)."""
    rewrites_frozen: bool = False
    """The frozen weights (and pools) are written in place every update: an engine holding low-precision
    parameters keeps an exact fp32 copy of them."""
    factor_step_counters: bool = False
    """The optimizer keeps a step counter per factor element (fp32: half a moment pair each)."""
    dense_first_layer: bool = False
    """Layer 0 keeps its dense projections (counted in N_other); only the later layers hold factors. The pool and
    projected-state counts (a dense LLaMA's) are not counted for such a model."""
    carried_outputs: bool = False
    """Each factored projection adds β times the previous layer's output of that projection: a trainable scalar per
    projection (counted with the norms), and the previous outputs β's gradient needs kept for backward (e 4h per
    token and layer)."""
    recompute: bool = False
    """Backward runs every decoder layer's forward again (2 more FLOPs per layer weight, the attention products'
    forward once more) and keeps only the recomputation's boundaries: the layer's input and its attention output
    (e 2h per token and layer)."""
    spectral_basis: bool = False
    """Each wrapped projection is held in its singular basis (SST): frozen U (m x k) and V (n x k) with every
    component (N_bases, k = min(m, n)), trainable singular values (N_sigma) and trainable copies of r columns of each
    (N_lora's r (m + n)); no dense W. The forward is factored: x V, scaled, times U^T (2 k (m + n) FLOPs per token),
    the input gradient the same again, the active columns' gradients 2 r (m + n); backward keeps x V (e k per token and
    projection). MFU counts the full-rank model, which it trains."""
    recompute_at_factors: bool = False
    """The recomputed segments are cut at the factors' r-wide activations: backward keeps those 7 as well (e 7r per
    token and layer), and the last layer's final factor, whose input a boundary keeps, is not recomputed (2 r h
    FLOPs per token less)."""

    def __post_init__(self):
        if self.frozen_weights and self.replaces_dense:
            raise ValueError("cost traits: frozen_weights holds the dense projections, replaces_dense holds none")
        needs_factors = ("replaces_dense", "factor_activation", "candidate_pools", "factor_step_counters",
                         "recompute_at_factors")
        missing = [name for name in needs_factors if getattr(self, name) and not self.low_rank_factors]
        if missing:
            raise ValueError(f"cost traits: {', '.join(missing)} need low_rank_factors")
        if self.recompute_at_factors and not self.recompute:
            raise ValueError("cost traits: recompute_at_factors needs recompute")
        clashing = [name for name in ("frozen_weights", "low_rank_factors", "replaces_dense") if getattr(self, name)]
        if self.spectral_basis and clashing:
            raise ValueError(f"cost traits: spectral_basis holds no dense W and no factors beside it ({', '.join(clashing)})")

    @property
    def adapters(self) -> bool:
        """Factors beside a held dense projection (LoRA-style): their output scaled and added to the projection's,
        and dropout on their input when the workload has one."""
        return self.low_rank_factors and not self.replaces_dense


FULL_RANK = CostTraits()
"""Every weight trains (the default of relora_dist.methods.Method)."""
FROZEN_WITH_ADAPTERS = CostTraits(frozen_weights=True, low_rank_factors=True)
"""Frozen projections plus trainable low-rank factors beside them (the ReLoRA family)."""


@dataclass(frozen=True)
class ModelCounts:
    layers: int
    hidden: int
    seq_len: int
    n_lin: int
    n_other: int
    n_lora: int
    n_head: int
    n_emb: int
    n_norm: int
    rank: int = 0
    n_projected_moments: int = 0
    """GaLore's Adam moments of the projections: 2 r max(m, n) per matrix (--galore-proj std)."""
    n_projectors: int = 0
    """GaLore's projectors: r min(m, n) per matrix (std)."""
    n_left_projected: int = 0
    """R's elements of the matrices std projects from the left (out < in: down_proj, and k/v under GQA), r in each:
    where an engine splits such a matrix's rows (FSDP2, ZeRO), the payload of the per-step all-reduce of the partial
    products, and half the moments every rank holding rows of it keeps whole."""
    n_pools: int = 0
    """SwitchLoRA's candidate pools: min(m, n) (m + n) per wrapped matrix."""
    n_bases: int = 0
    """SST's frozen bases U and V: min(m, n) (m + n) per wrapped matrix (as many elements as SwitchLoRA's pools)."""
    n_sigma: int = 0
    """SST's singular values: min(m, n) per wrapped matrix."""

    @classmethod
    def from_config(cls, config: LlamaConfig, *, rank: int | None, seq_len: int, traits: CostTraits,
                    targets=PROJECTIONS) -> "ModelCounts":
        """`rank`: the low-rank factors' (a CoLA or CR-Net config's own `rank` wins); `traits`: the method's, for the
        layout they imply (a dense first layer, a carried-output scalar per projection). The queries below take the
        traits to count by."""
        check_traits(traits)
        rank = getattr(config, "rank", None) or rank or 0
        h, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
        kv = h * config.num_key_value_heads // config.num_attention_heads
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # (in, out)
        wrapped = [shapes[name] for name in PROJECTIONS if any(t in name for t in targets)]
        factored = L - 1 if traits.dense_first_layer else L  # the layers whose wrapped projections hold factors
        dense, wrapped_dense = sum(i * o for i, o in shapes.values()), sum(i * o for i, o in wrapped)
        layout = dict(
            layers=L, hidden=h, seq_len=seq_len,
            n_lin=factored * wrapped_dense,
            n_other=L * dense - factored * wrapped_dense,
            n_lora=factored * sum(rank * (i + o) for i, o in wrapped),
            n_head=0 if config.tie_word_embeddings else v * h,
            n_emb=v * h,
            n_norm=(2 * L + 1) * h + (factored * len(wrapped) if traits.carried_outputs else 0),  # and one β each
            rank=rank,
        )
        if traits.dense_first_layer:
            return cls(**layout)
        return cls(
            **layout,
            n_pools=L * sum(min(i, o) * (i + o) for i, o in wrapped),
            n_bases=L * sum(min(i, o) * (i + o) for i, o in wrapped),
            n_sigma=L * sum(min(i, o) for i, o in wrapped),
            n_projected_moments=L * sum(_projected_moments(i, o, rank) for i, o in shapes.values()),
            n_projectors=L * sum(min(rank, i, o) * min(i, o) for i, o in shapes.values()),
            n_left_projected=L * sum(min(rank, i, o) * i for i, o in shapes.values() if o < i),
        )

    @property
    def n_full(self) -> int:
        """Parameters of the full-rank model."""
        return self.n_lin + self.n_other + self.n_head + self.n_emb + self.n_norm

    def trainable(self, traits: CostTraits) -> int:
        check_traits(traits)
        if traits.spectral_basis:  # singular values and r active columns of U and V per projection
            return self.n_sigma + self.n_lora + self.n_other + self.n_head + self.n_emb + self.n_norm
        if not (traits.frozen_weights or traits.replaces_dense):  # the dense projections train
            return self.n_full + (self.n_lora if traits.low_rank_factors else 0)
        return (self.n_lora if traits.low_rank_factors else 0) + self.n_other + self.n_head + self.n_emb + self.n_norm

    def held(self, traits: CostTraits) -> int:
        """Parameters resident on a replica (frozen W and candidate pools included)."""
        check_traits(traits)
        held = self.trainable(traits) + (self.n_lin if traits.frozen_weights else 0)
        return held + (self.n_pools if traits.candidate_pools else 0) + (self.n_bases if traits.spectral_basis else 0)

    def written_frozen(self, traits: CostTraits) -> int:
        """Frozen elements written in place (SwitchLoRA folds into W and parks in its pools every update, SST writes its
        bases at resamples and re-SVDs), which an engine holding bf16 parameters keeps an fp32 copy of."""
        check_traits(traits)
        if not traits.rewrites_frozen:
            return 0
        return ((self.n_lin if traits.frozen_weights else 0) + (self.n_pools if traits.candidate_pools else 0)
                + (self.n_bases if traits.spectral_basis else 0))

    def optimizer_elements(self, traits: CostTraits) -> int:
        """Adam moment elements: 2 per trainable parameter, the projected moments in place of the projections' with
        projected state (--galore-proj std), and a step
        counter per factor element where the optimizer keeps one (fp32, counted as half a moment pair)."""
        check_traits(traits)
        if traits.projected_state:
            elements = 2 * (self.n_full - self.n_lin - self.n_other) + self.n_projected_moments
        else:
            elements = 2 * self.trainable(traits)
        return elements + (self.n_lora if traits.factor_step_counters else 0)

    def projector_elements(self, traits: CostTraits) -> int:
        """The projected state's projectors (GaLore's, Fira's; Fira's limiter scalar per matrix not counted)."""
        check_traits(traits)
        if not traits.projected_state:
            return 0
        return self.n_projectors

    def executed_flops_per_token(self, traits: CostTraits, *, attention: bool = True) -> int:
        """Forward + backward FLOPs actually run per token (dense GEMMs; attention products optional). Projecting a
        gradient is the optimizer's and a switch is per update, not per token; a carried output (β Y_prev) is
        elementwise: no GEMM."""
        check_traits(traits)
        # Causal flash attention: QK^T and PV over half the (s x s) scores, 2 s h forward, 5 s h backward.
        products = 7 * self.seq_len * self.hidden * self.layers
        held_dense = 0 if traits.replaces_dense or traits.spectral_basis else self.n_lin  # the wrapped dense W, if run
        dense = 6 * (self.n_other + self.n_head) + (4 if traits.frozen_weights else 6) * held_dense
        if traits.spectral_basis:  # factored forward and input gradient through both bases, the active columns' grads
            dense += 4 * self.n_bases + 2 * self.n_lora
        factors = self.n_lora if traits.low_rank_factors else 0
        dense += 6 * factors
        if traits.recompute:  # every layer's forward once more in backward (the head's not)
            dense += 2 * (held_dense + factors + self.n_other)
            if traits.recompute_at_factors:  # but for the last segment's final factor, whose input the boundary keeps
                dense -= 2 * self.rank * self.hidden
            products = 9 * self.seq_len * self.hidden * self.layers
        return dense + (products if attention else 0)

    def model_flops_per_token(self, traits: CostTraits = FULL_RANK) -> int:
        """The MFU numerator: 6 N + 12 L h s with N the trained model's parameters (the full-rank model's for ReLoRA and
        its baselines; the model's own where the factors replace the dense projections, as CoLA's)."""
        check_traits(traits)
        n = self.held(traits) if traits.replaces_dense else self.n_full
        return 6 * n + 12 * self.layers * self.hidden * self.seq_len


def _projected_moments(fan_in: int, fan_out: int, rank: int) -> int:
    """GaLore's moments of one (fan_out x fan_in) weight: two r x (larger side), r capped by both sides."""
    return 2 * min(rank, fan_in, fan_out) * max(fan_in, fan_out)


def check_traits(traits) -> None:
    """TypeError unless `traits` is a CostTraits (a method name or a cost-structure string is not)."""
    if not isinstance(traits, CostTraits):
        raise TypeError("perf counts by cost traits (a method's `cost_traits`, a relora_dist.perf.accounting."
                        f"CostTraits), got {traits!r}")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a replica keeps per parameter."""

    weights: int = 4  # the module's own parameters
    master: int = 0  # a separate fp32 master copy of trainable params (0: the params are the masters)
    grads: int = 4
    adam: int = 8  # exp_avg + exp_avg_sq
    exact_copies: int = 0  # an fp32 copy of the frozen params a method writes in place (access.fp32_frozen_parameters)

    @classmethod
    def named(cls, name: str) -> "Precision":
        presets = {
            "fp32": cls(),  # fp32 params, grads and Adam (also DDP/OSS bf16 autocast: params stay fp32)
            "bf16_master": cls(weights=2, master=4, grads=2, adam=8, exact_copies=4),  # DeepSpeed bf16: bf16 params, fp32 masters
            "pure_bf16": cls(weights=2, master=0, grads=2, adam=4),  # the paper's throughput runs
        }
        if name not in presets:
            raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(presets)}")
        return presets[name]


def static_bytes(counts: ModelCounts, traits: CostTraits, precision: Precision) -> dict[str, int]:
    """Per-replica bytes by category, before any sharding: parameters (held), fp32 masters, gradients and Adam
    states of the trainable ones (GaLore's projected moments and projectors as --galore-proj std lays them out)."""
    held, trainable = counts.held(traits), counts.trainable(traits)
    return {
        "parameters": precision.weights * held,
        "master": precision.master * trainable,
        "gradients": precision.grads * trainable,
        "optimizer": precision.adam * counts.optimizer_elements(traits) // 2,
        "projectors": precision.adam * counts.projector_elements(traits) // 2,
        "exact_copies": precision.exact_copies * counts.written_frozen(traits),
    }


def gradient_bytes_per_update(counts: ModelCounts, traits: CostTraits, *, grad_bytes: int, all_reduces: int = 1) -> int:
    """Payload of the gradient all-reduces of one update: every trainable gradient once per all-reduce (DDP reduces
    once per update with no_sync, once per micro-batch without: the paper's loop)."""
    return grad_bytes * counts.trainable(traits) * all_reduces
