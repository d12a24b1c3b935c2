"""CR-Net (Kong, Liang, Liu, Deng, Yuan; arXiv 2509.18993, ICLR 2026): a LLaMA whose first decoder layer is dense and
whose later layers rebuild every projection's output from the previous layer's output of the same projection plus a
low-rank difference:

    Y_l^P = β̃_l^P Y_{l-1}^P + (X_l^P A_l^P) B_l^P,    β̃ = sign(β) (|β| + ε),

for P in q, k, v, o, gate, up, down; X_l^P is the projection's usual input in layer l, β a learnable scalar per layer
and projection. The official code (KongBoao/CR-Net) could not be fetched: this follows the paper as summarised in
research/peers_impl.md section 6. Choices the paper summary leaves open are options of the config, documented in
docs/METHODS.md: β starts at `beta_init` (1), A like nn.Linear's weight (Kaiming uniform), B at zero (so every later
layer starts by repeating the previous layer's projections), ε `epsilon` (1e-3), Y^q and Y^k before the rotary
embedding.

Between decoder layers flows (hidden states, the 7 projection outputs); the last layer returns the hidden states.
Each layer's forward reads only its own parameters (per-layer sharding needs nothing else). Layer 0 keeps HF LLaMA's
modules and key names.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..models import LLAMA_PROJECTIONS as PROJECTIONS
from .attention import AttentionCore, llama_shape


@strict
class CRNetConfig(LlamaConfig):
    model_type = "crnet"
    rank: int | None = None
    """Rank r of every low-rank difference (default hidden_size // 4: about half the dense parameters)."""
    epsilon: float = 1e-3
    """ε in β̃ = sign(β)(|β| + ε): keeps every carried term away from zero (the inverse reconstruction divides by it)."""
    beta_init: float = 1.0
    """Initial β of every projection of layers >= 1."""
    recompute_every: int = 0
    """0: plain autograd. k > 0: every layer is recomputed in backward from its input; every k-th layer (and the last)
    also keeps the 7 projection outputs it was given, the others keep their attention output and rebuild them
    backwards with the inverse Y_{l-1} = (Y_l - X_l A_l B_l) / β̃_l from their own outputs, which the next layer's
    backward hands down. 1: every layer keeps them (exact, no inverse)."""

    def __post_init__(self, **kwargs):
        if self.rank is None:
            self.rank = self.hidden_size // 4
        super().__post_init__(**kwargs)


def crnet_config(base: LlamaConfig, *, rank: int | None, epsilon: float, beta_init: float,
                 recompute_every: int = 0) -> CRNetConfig:
    return CRNetConfig(**(llama_shape(base) | {"rank": rank, "epsilon": epsilon, "beta_init": beta_init,
                                    "recompute_every": recompute_every}))


def effective_beta(beta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """β̃ = sign(β)(|β| + ε), with sign(0) = +1 (so β = 0 carries ε, never nothing)."""
    sign = torch.where(beta < 0, -torch.ones_like(beta), torch.ones_like(beta))
    return sign * (beta.abs() + epsilon)


class CRNetLinear(nn.Module):
    """One projection of a layer >= 1: Y = β̃ Y_prev + (x A) B, A (in x r), B (r x out)."""

    def __init__(self, in_features: int, out_features: int, config: CRNetConfig):
        super().__init__()
        self.epsilon = config.epsilon
        self.cr_a = nn.Parameter(torch.empty(in_features, config.rank))
        # nn.Linear's default weight init (Kaiming uniform with a = sqrt(5)), fan-in = in_features
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.cr_a, -bound, bound)
        self.cr_b = nn.Parameter(torch.zeros(config.rank, out_features))
        # shape (1,), not a 0-dim scalar: engines shard dim 0 and view parameters as bytes (DeepSpeed's broadcast)
        self.beta = nn.Parameter(torch.full((1,), float(config.beta_init)))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(x, self.cr_a), self.cr_b)

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return effective_beta(self.beta, self.epsilon) * previous + self.low_rank(x)

    def previous_output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The inverse: Y_prev = (Y - (x A) B) / β̃ (what a recomputation rebuilds instead of storing Y_prev)."""
        return (y - self.low_rank(x)) / effective_beta(self.beta, self.epsilon)


class CRNetAttention(AttentionCore):
    """q/k/v/o of one layer (dense nn.Linear in layer 0, CRNetLinear after) around HF LLaMA's attention."""


class CRNetDecoderLayer(nn.Module):
    """One CR-Net layer. Takes (hidden, previous layer's 7 projection outputs), or the embeddings in layer 0; returns
    (hidden, its own 7 projection outputs), or the hidden states in the last layer."""

    def __init__(self, config: CRNetConfig, layer_idx: int, dense=None):
        super().__init__()
        self.index = layer_idx
        self.first, self.last = layer_idx == 0, layer_idx == config.num_hidden_layers - 1
        every = config.recompute_every
        self.recompute = every > 0
        keeps = lambda i: i > 0 and (i == config.num_hidden_layers - 1 or (every > 0 and i % every == 0))  # noqa: E731
        # A layer that keeps the outputs it was given recomputes exactly; one that does not rebuilds them from its own
        # outputs, which the next layer hands down (layer 0 takes no outputs and needs none).
        self.keeps_previous = keeps(layer_idx)
        self.hands_down = layer_idx > 1 and not keeps(layer_idx - 1)
        self.rebuilt: dict[int, list[torch.Tensor]] = {}  # shared by the model's layers (CRNetForCausalLM)
        self.self_attn = CRNetAttention(config, layer_idx)
        if self.first:  # HF LLaMA's own layer 0: its modules, its init, its key names
            self.mlp = dense.mlp
            for name in PROJECTIONS[:4]:
                setattr(self.self_attn, name, getattr(dense.self_attn, name))
            self.input_layernorm, self.post_attention_layernorm = dense.input_layernorm, dense.post_attention_layernorm
            return
        h, f = config.hidden_size, config.intermediate_size
        q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        for name, (i, o) in zip(PROJECTIONS[:4], ((h, q_out), (h, kv_out), (h, kv_out), (q_out, h))):
            setattr(self.self_attn, name, CRNetLinear(i, o, config))
        self.mlp = nn.Module()
        for name, (i, o) in zip(PROJECTIONS[4:], ((h, f), (h, f), (f, h))):
            setattr(self.mlp, name, CRNetLinear(i, o, config))
        self.mlp.act_fn = ACT2FN[config.hidden_act]
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)

    def projections(self) -> list[nn.Module]:
        """The 7 projections in PROJECTIONS order."""
        return [getattr(self.self_attn, n) for n in PROJECTIONS[:4]] + [getattr(self.mlp, n) for n in PROJECTIONS[4:]]

    def compute(self, hidden, previous, position_embeddings, attention_mask):
        """(hidden out, the 7 projection outputs, the attention output) from the layer's input and the previous
        layer's outputs (None in layer 0)."""
        modules = self.projections()

        def project(i: int, x: torch.Tensor) -> torch.Tensor:
            return modules[i](x) if previous is None else modules[i](x, previous[i])

        x = self.input_layernorm(hidden)
        q, k, v = project(0, x), project(1, x), project(2, x)
        attended = self.self_attn.attend(q, k, v, *position_embeddings, attention_mask)
        o = project(3, attended)
        hidden = hidden + o
        x = self.post_attention_layernorm(hidden)
        gate, up = project(4, x), project(5, x)
        down = project(6, self.mlp.act_fn(gate) * up)
        return hidden + down, (q, k, v, o, gate, up, down), attended

    def projection_inputs(self, hidden, attended, outputs) -> list[torch.Tensor]:
        """X of each projection, from the layer's input, its attention output and its own projection outputs (what
        the inverse needs; no attention is recomputed)."""
        x = self.input_layernorm(hidden)
        mid = self.post_attention_layernorm(hidden + outputs[3])
        return [x, x, x, attended, mid, mid, self.mlp.act_fn(outputs[4]) * outputs[5]]

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        hidden, previous = (hidden_states, None) if self.first else hidden_states
        if self.recompute and torch.is_grad_enabled():
            result = InverseRecompute.apply(self, position_embeddings, attention_mask, hidden, *(previous or ()))
            out, outputs = (result, None) if self.last else (result[0], tuple(result[1:]))
        else:
            out, outputs, _ = self.compute(hidden, previous, position_embeddings, attention_mask)
        # HF LlamaModel hands each layer's output to the next layer as is: the pair flows between layers.
        return out if self.last else (out, outputs)


class InverseRecompute(torch.autograd.Function):
    """One CR-Net layer that keeps for backward its input and either the previous layer's outputs it was given (every
    k-th layer, the last) or its attention output. Backward gets the previous outputs back (kept, or rebuilt with the
    inverse from this layer's own outputs, which the next layer's backward handed down), hands them down in turn,
    runs the layer's forward again and backpropagates through it. The recompute calls the layer's own modules, so an
    engine that gathers a layer's parameters for its backward (FSDP2, ZeRO-3) serves it; parameter gradients
    accumulate through autograd as in any backward."""

    @staticmethod
    def forward(ctx, layer, position_embeddings, attention_mask, hidden, *previous):
        out, outputs, attended = layer.compute(hidden, previous or None, position_embeddings, attention_mask)
        ctx.layer, ctx.position_embeddings, ctx.attention_mask = layer, position_embeddings, attention_mask
        if layer.first:
            ctx.save_for_backward(hidden)
        elif layer.keeps_previous:
            ctx.save_for_backward(hidden, *previous)
        else:
            ctx.save_for_backward(hidden, attended)
        return out if layer.last else (out, *outputs)

    @staticmethod
    def backward(ctx, *grads):
        layer = ctx.layer
        hidden, *saved = ctx.saved_tensors
        previous = None
        if layer.keeps_previous:
            previous = saved
        elif not layer.first:
            outputs = layer.rebuilt.pop(layer.index)
            with torch.no_grad():
                inputs = layer.projection_inputs(hidden, saved[0], outputs)
                previous = [m.previous_output(y, x) for m, y, x in zip(layer.projections(), outputs, inputs)]
        if layer.hands_down:
            layer.rebuilt[layer.index - 1] = previous
        with torch.enable_grad():
            hidden = hidden.detach().requires_grad_()
            previous = [p.detach().requires_grad_() for p in previous] if previous is not None else None
            out, outputs, _ = layer.compute(hidden, previous, ctx.position_embeddings, ctx.attention_mask)
            pairs = [(t, g) for t, g in zip((out, *outputs), grads) if g is not None]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return None, None, None, hidden.grad, *(p.grad for p in previous or ())


class CRNetForCausalLM(LlamaForCausalLM):
    """HF LLaMA with layers >= 1 rebuilt as CR-Net layers (embeddings, norms, layer 0 and the head as in LLaMA)."""

    config_class = CRNetConfig

    def __init__(self, config: CRNetConfig):
        super().__init__(config)
        dense = self.model.layers
        self.model.layers = nn.ModuleList(CRNetDecoderLayer(config, i, dense[0] if i == 0 else None)
                                          for i in range(config.num_hidden_layers))
        rebuilt: dict[int, list[torch.Tensor]] = {}  # each layer's outputs, rebuilt by the next layer's backward
        for layer in self.model.layers:
            layer.rebuilt = rebuilt


AutoConfig.register(CRNetConfig.model_type, CRNetConfig)
AutoModelForCausalLM.register(CRNetConfig, CRNetForCausalLM)
