"""Exact per-token FLOPs, static bytes and gradient traffic of a LLaMA config trained full rank, with ReLoRA, or
as CoLA / CoLA-M (a method's `cost_structure`).

These are the identities the throughput harness reports and the performance model builds on
(SPEC section 4, research/perf_model.md section 2). They are tested against FlopCounterMode and
real optimizer state (tests/test_perf_accounting.py).
- N_lin: the projections ReLoRA wraps (frozen W); N_other: projections it leaves full rank; N_head; N_emb;
  N_norm; N_lora = sum over wrapped projections of r(in + out).
- Executed FLOPs per token: full 6(N_lin + N_other + N_head); ReLoRA 4 N_lin + 6 N_lora + 6(N_other + N_head)
  (no dW for a frozen W). Attention comes on top as causal flash attention executes it: 2 s h per layer
  forward, 5 s h backward (recompute included); FlopCounterMode does not see the CPU SDPA kernel.
- CoLA: every projection is the bottleneck sigma(x A) B and nothing is frozen: N_lora (= sum r(in + out)) replaces
  N_lin, executed 6 N_lora + 6(N_other + N_head); CoLA-M recomputes every layer's forward in backward: 8 N_lora
  (less the last layer's final B, 2 r h, which needs no recompute), and the attention products' forward once more
  (9 s h per layer).
- CR-Net: layer 0 dense (N_other), the later layers' low-rank differences (N_lora) and one β per projection (counted
  with the norms); executed as CoLA, or with its inverse recomputation every layer's forward once more:
  8(N_lora + N_other) + 6 N_head and 9 s h per layer. N_lin is then the dense projections CR-Net replaced, for
  reference only.
- MFU convention (PaLM / nanoGPT / torchtitan): 6 N + 12 L h s FLOPs per token, N = the full-rank model's
  parameters (CoLA's: its own, smaller model). HFU uses the executed FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from ..models import LLAMA_PROJECTIONS as PROJECTIONS

# How a method's parameters, FLOPs and bytes are counted (relora_dist.methods.Method.cost_structure): every weight
# trains; frozen projections plus trainable low-rank factors; every projection a trainable bottleneck (CoLA), and
# that with every layer's forward recomputed in backward (CoLA-M).
COST_STRUCTURES = ("full", "relora", "switchlora", "cola", "cola_m", "crnet", "crnet_recompute", "galore", "fira")
# Frozen projections plus trainable low-rank factors; SwitchLoRA also holds its candidate pools (frozen) and a step
# counter per factor element in the optimizer.
LOW_RANK = ("relora", "switchlora")
# Full-rank models whose optimizer keeps rank-r projected moments and a projector per projection (GaLore, Fira).
PROJECTED_STATE = ("galore", "fira")
BOTTLENECK = ("cola", "cola_m", "crnet", "crnet_recompute")  # nothing frozen: every parameter held trains


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
    n_projected_moments_right: int = 0
    """The same with every matrix projected from the right, as the engines that split rows do: 2 r out per matrix."""
    n_projectors_right: int = 0
    """r in per matrix (right projection)."""
    n_pools: int = 0
    """SwitchLoRA's candidate pools: min(m, n) (m + n) per wrapped matrix."""

    @classmethod
    def from_config(cls, config: LlamaConfig, *, rank: int | None, seq_len: int, targets=PROJECTIONS) -> "ModelCounts":
        """`rank`: the low-rank factors' (a CoLA config's own `rank` wins)."""
        rank = getattr(config, "rank", None) or rank or 0
        h, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
        kv = h * config.num_key_value_heads // config.num_attention_heads
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # (in, out)
        wrapped = [shapes[name] for name in PROJECTIONS if any(t in name for t in targets)]
        if getattr(config, "model_type", "llama") == "crnet":  # layer 0 dense, the others low rank with one β each
            dense = sum(i * o for i, o in shapes.values())
            return cls(layers=L, hidden=h, seq_len=seq_len, n_lin=(L - 1) * dense, n_other=dense,
                       n_lora=(L - 1) * sum(rank * (i + o) for i, o in shapes.values()),
                       n_head=0 if config.tie_word_embeddings else v * h, n_emb=v * h,
                       n_norm=(2 * L + 1) * h + (L - 1) * len(shapes), rank=rank)
        return cls(
            layers=L, hidden=h, seq_len=seq_len,
            n_lin=L * sum(i * o for i, o in wrapped),
            n_other=L * sum(i * o for i, o in shapes.values()) - L * sum(i * o for i, o in wrapped),
            n_lora=L * sum(rank * (i + o) for i, o in wrapped),
            n_head=0 if config.tie_word_embeddings else v * h,
            n_emb=v * h,
            n_norm=(2 * L + 1) * h,
            rank=rank,
            n_pools=L * sum(min(i, o) * (i + o) for i, o in wrapped),
            n_projected_moments=L * sum(_projected_moments(i, o, rank) for i, o in shapes.values()),
            n_projectors=L * sum(min(rank, i, o) * min(i, o) for i, o in shapes.values()),
            n_projected_moments_right=L * sum(2 * min(rank, i, o) * o for i, o in shapes.values()),
            n_projectors_right=L * sum(min(rank, i, o) * i for i, o in shapes.values()),
        )

    @property
    def n_full(self) -> int:
        """Parameters of the full-rank model."""
        return self.n_lin + self.n_other + self.n_head + self.n_emb + self.n_norm

    def trainable(self, method: str) -> int:
        _check(method)
        return self.n_full if method in ("full", *PROJECTED_STATE) else self.n_lora + self.n_other + self.n_head + self.n_emb + self.n_norm

    def held(self, method: str) -> int:
        """Parameters resident on a replica (frozen W included)."""
        if method in BOTTLENECK:
            return self.trainable(method)
        if method == "switchlora":
            return self.n_full + self.n_lora + self.n_pools
        return self.n_full if method in ("full", *PROJECTED_STATE) else self.n_full + self.n_lora

    def written_frozen(self, method: str) -> int:
        """Frozen elements a method writes in place every update (SwitchLoRA folds into W and parks in its pools), which
        an engine holding bf16 parameters keeps an fp32 copy of."""
        return self.n_lin + self.n_pools if method == "switchlora" else 0

    def optimizer_elements(self, method: str, *, right: bool = False) -> int:
        """Adam moment elements: 2 per trainable parameter, the projected moments in place of the projections' for
        GaLore and Fira (`right`: every matrix projected from the right, as on FSDP2 and ZeRO-1/2/3)."""
        if method in PROJECTED_STATE:
            moments = self.n_projected_moments_right if right else self.n_projected_moments
            return 2 * (self.n_full - self.n_lin - self.n_other) + moments
        if method == "switchlora":  # and a step counter per factor element (fp32, counted as half a moment pair)
            return 2 * self.trainable(method) + self.n_lora
        return 2 * self.trainable(method)

    def projector_elements(self, method: str, *, right: bool = False) -> int:
        """GaLore's and Fira's projectors (none for the other methods; Fira's limiter scalar per matrix not counted)."""
        if method not in PROJECTED_STATE:
            return 0
        return self.n_projectors_right if right else self.n_projectors

    def executed_flops_per_token(self, method: str, *, attention: bool = True) -> int:
        """Forward + backward FLOPs actually run per token (dense GEMMs; attention products optional)."""
        _check(method)
        rest = 6 * (self.n_other + self.n_head)
        # Causal flash attention: QK^T and PV over half the (s x s) scores, 2 s h forward, 5 s h backward.
        products = 7 * self.seq_len * self.hidden * self.layers
        if method in ("full", *PROJECTED_STATE):  # projecting the gradient is the optimizer's, not per token
            dense = 6 * self.n_lin + rest
        elif method in LOW_RANK:  # SwitchLoRA's switches are per update, not per token
            dense = 4 * self.n_lin + 6 * self.n_lora + rest
        elif method in ("cola", "crnet"):  # CR-Net's β Y_prev is elementwise: no GEMM
            dense = 6 * self.n_lora + rest
        elif method == "cola_m":  # the layers' forward once more in backward, but for the last segment's B, whose
            # inputs the checkpoint keeps anyway (nothing to recompute)
            dense = 8 * self.n_lora - 2 * self.rank * self.hidden + rest
            products = 9 * self.seq_len * self.hidden * self.layers
        else:  # crnet_recompute: every layer's forward (layer 0's dense projections too) once more in backward
            dense = 8 * (self.n_lora + self.n_other) + 6 * self.n_head
            products = 9 * self.seq_len * self.hidden * self.layers
        return dense + (products if attention else 0)

    def model_flops_per_token(self, method: str = "full") -> int:
        """The MFU numerator: 6 N + 12 L h s with N the trained model's parameters (the full-rank model's for ReLoRA and
        its baselines, CoLA's own for CoLA)."""
        n = self.held(method) if method in BOTTLENECK else self.n_full
        return 6 * n + 12 * self.layers * self.hidden * self.seq_len


def _projected_moments(fan_in: int, fan_out: int, rank: int) -> int:
    """GaLore's moments of one (fan_out x fan_in) weight: two r x (larger side), r capped by both sides."""
    return 2 * min(rank, fan_in, fan_out) * max(fan_in, fan_out)


def _check(method: str) -> None:
    if method not in COST_STRUCTURES:
        raise ValueError(f"unknown cost structure {method!r}; choose one of {', '.join(COST_STRUCTURES)}")


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


def static_bytes(counts: ModelCounts, method: str, precision: Precision, *, right_projection: bool = False) -> dict[str, int]:
    """Per-replica bytes by category, before any sharding: parameters (held), fp32 masters, gradients and Adam
    states of the trainable ones (GaLore's moments and projectors with every matrix projected from the right when
    `right_projection`: the engines that split rows)."""
    held, trainable = counts.held(method), counts.trainable(method)
    return {
        "parameters": precision.weights * held,
        "master": precision.master * trainable,
        "gradients": precision.grads * trainable,
        "optimizer": precision.adam * counts.optimizer_elements(method, right=right_projection) // 2,
        "projectors": precision.adam * counts.projector_elements(method, right=right_projection) // 2,
        "exact_copies": precision.exact_copies * counts.written_frozen(method),
    }


def gradient_bytes_per_update(counts: ModelCounts, method: str, *, grad_bytes: int, all_reduces: int = 1) -> int:
    """Payload of the gradient all-reduces of one update: every trainable gradient once per all-reduce (DDP reduces
    once per update with no_sync, once per micro-batch without: the paper's loop)."""
    return grad_bytes * counts.trainable(method) * all_reduces
