"""CoLA and CoLA-M (Liu et al. 2025, arXiv 2502.10940; official code alvin-zyl/CoLA @91ff0d10): a LLaMA whose
every projection is the low-rank bottleneck `h = σ(x A) B`, A (in x r), B (r x out), σ the model's activation.

- `ColaForCausalLM` keeps HF LLaMA's module tree and key names (`...self_attn.q_proj.cola_a`); only the seven
  projections change, and with `only_lr_act` the MLP's outer SiLU goes (SiLU then lives only inside each
  bottleneck: the official 350M/1B/7B configs; their 60M/130M configs keep it).
- `ColaMForCausalLM` (CoLA-M) has the same parameters with the decoder layers re-cut at the r-wide activations, as
  the official modeling_colam.py does: layer l owns layer l-1's down-projection B (`last_layer_post_mlp`), and each
  layer runs four recomputed segments whose boundaries are r-wide tensors and the residual stream, so backward
  keeps 2 hidden + 7 r values per token and layer. Each decoder layer's forward only reads its own parameters,
  which is what per-layer sharding (FSDP2 `fully_shard`, ZeRO-3's module hooks) needs. Recomputation uses torch's
  non-reentrant checkpoint (the official code uses the reentrant one: same numbers, and the non-reentrant one
  composes with FSDP2's hooks and torch.compile).
- `cola_m_state_from_cola` / `cola_state_from_cola_m` convert checkpoints between the two key maps.

Both register with transformers' Auto classes when relora_dist is imported, so an exported model loads with
`AutoModelForCausalLM.from_pretrained(DIR)`.
"""

from __future__ import annotations

import re

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..models import ATTENTION_PROJECTIONS as ATTENTION
from ..models import MLP_PROJECTIONS as MLP
from .attention import AttentionCore, llama_shape

# The official configs' ranks by hidden size (cola_configs/cola_{60m,130m,350m,1b,7b}.json); other sizes take
# ColaConfig's own default, hidden // 4.
OFFICIAL_RANKS = {512: 128, 768: 256, 1024: 256, 2048: 512, 4096: 1024}
# The official configs drop the MLP's outer SiLU (only_lr_act) from 350M (hidden 1024) up.
ONLY_LR_ACT_FROM_HIDDEN = 1024


@strict
class ColaConfig(LlamaConfig):
    model_type = "cola"
    rank: int | None = None
    """Bottleneck width r of every projection (default hidden_size // 4, as the official ColaConfig)."""
    only_lr_act: bool = True
    """Drop the MLP's outer activation: down(gate(x) * up(x)), σ only inside each bottleneck."""
    lr_act_type: str | None = None
    """σ inside each bottleneck (default: hidden_act)."""

    def __post_init__(self, **kwargs):
        if self.rank is None:
            self.rank = self.hidden_size // 4
        if self.lr_act_type is None:
            self.lr_act_type = self.hidden_act
        super().__post_init__(**kwargs)


@strict
class ColaMConfig(ColaConfig):
    model_type = "cola_m"


def cola_config(base: LlamaConfig, *, rank: int | None, only_lr_act: bool | None,
                memory_efficient: bool = False) -> ColaConfig:
    """The CoLA (or CoLA-M) config of a LLaMA shape; unset knobs follow the official config of that size."""
    values = llama_shape(base)
    hidden = base.hidden_size
    values["rank"] = rank if rank is not None else OFFICIAL_RANKS.get(hidden, hidden // 4)
    values["only_lr_act"] = only_lr_act if only_lr_act is not None else hidden >= ONLY_LR_ACT_FROM_HIDDEN
    return (ColaMConfig if memory_efficient else ColaConfig)(**values)


def _factor(rows: int, cols: int, *, rank: int, in_features: int, out_features: int) -> nn.Parameter:
    """The official init of A and B: N(0, 1) / r^(1/4) / (in + out)^(1/4), so A B has the variance of a dense W
    with std (in + out)^(-1/2)."""
    return nn.Parameter(torch.randn(rows, cols) / rank ** 0.25 * (in_features + out_features) ** -0.25)


def _bias(out_features: int, enabled: bool) -> nn.Parameter | None:
    bound = out_features ** -0.5
    return nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if enabled else None


class ColaDown(nn.Module):
    """σ(x A): the first half of a bottleneck (CoLA-M's `ColaMDownProjLayer`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, act: str):
        super().__init__()
        self.cola_a = _factor(in_features, rank, rank=rank, in_features=in_features, out_features=out_features)
        self.lr_act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lr_act(torch.matmul(x, self.cola_a))


class ColaUp(nn.Module):
    """z B (+ bias): the second half of a bottleneck (CoLA-M's `ColaMUpProjLayer`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.cola_b = _factor(rank, out_features, rank=rank, in_features=in_features, out_features=out_features)
        self.bias = _bias(out_features, bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(z, self.cola_b)
        return out if self.bias is None else out + self.bias


class ColaLinear(ColaDown):
    """A projection as CoLA's bottleneck: σ(x A) B (+ bias), the official `ColaLayer` (same parameter names)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool, act: str):
        super().__init__(in_features, out_features, rank, act)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.cola_b = _factor(rank, out_features, rank=rank, in_features=in_features, out_features=out_features)
        self.bias = _bias(out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ColaUp.forward(self, super().forward(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def _bottleneck(linear: nn.Linear, config: ColaConfig) -> ColaLinear:
    return ColaLinear(linear.in_features, linear.out_features, config.rank, bias=linear.bias is not None,
                      act=config.lr_act_type)


def _make_bottlenecks(model: LlamaForCausalLM, config: ColaConfig) -> None:
    """Every projection of a freshly built HF LLaMA becomes a bottleneck, drawn layer by layer in projection order."""
    for layer in model.model.layers:
        for name in ATTENTION:
            setattr(layer.self_attn, name, _bottleneck(getattr(layer.self_attn, name), config))
        for name in MLP:
            setattr(layer.mlp, name, _bottleneck(getattr(layer.mlp, name), config))
        if config.only_lr_act:
            layer.mlp.act_fn = nn.Identity()


class ColaForCausalLM(LlamaForCausalLM):
    """HF LLaMA with every projection a CoLA bottleneck (embeddings, norms and the head stay dense)."""

    config_class = ColaConfig

    def __init__(self, config: ColaConfig):
        super().__init__(config)
        _make_bottlenecks(self, config)


# -- CoLA-M ------------------------------------------------------------------------------------------------------


def _segment(function, *args):
    """Run one CoLA-M segment: recomputed in backward (only its inputs are kept), plain when nothing records grads."""
    if not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


class ColaMAttention(AttentionCore):
    """The attention core between CoLA-M's boundaries: q/k/v's B factors, rotary, attention, o's A factor
    (the official `CoLAMSelfAttn`)."""

    def __init__(self, config: ColaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, r = config.hidden_size, config.rank
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.post_q_proj = ColaUp(h, q_out, r, bias=config.attention_bias)
        self.post_k_proj = ColaUp(h, kv_out, r, bias=config.attention_bias)
        self.post_v_proj = ColaUp(h, kv_out, r, bias=config.attention_bias)
        self.pre_o_proj = ColaDown(q_out, h, r, config.lr_act_type)

    def forward(self, query, key, value, cos, sin, attention_mask):
        attended = self.attend(self.post_q_proj(query), self.post_k_proj(key), self.post_v_proj(value), cos, sin,
                               attention_mask)
        return self.pre_o_proj(attended)


class _Factors(nn.Module):
    """A named group of bottleneck halves (the official PreAttn / PostAttn / PreMLP / PostMLP containers)."""

    def __init__(self, **halves: nn.Module):
        super().__init__()
        for name, half in halves.items():
            self.add_module(name, half)


class ColaMLowRankMLP(nn.Module):
    """gate/up's B factors, the gate activation unless only_lr_act, the product, down's A factor (`CoLAMSelfMLP`)."""

    def __init__(self, config: ColaConfig):
        super().__init__()
        h, f, r = config.hidden_size, config.intermediate_size, config.rank
        self.post_gate_proj = ColaUp(h, f, r, bias=config.mlp_bias)
        self.post_up_proj = ColaUp(h, f, r, bias=config.mlp_bias)
        self.act_fn = nn.Identity() if config.only_lr_act else ACT2FN[config.hidden_act]
        self.pre_down_proj = ColaDown(f, h, r, config.lr_act_type)

    def forward(self, gate, up):
        return self.pre_down_proj(self.act_fn(self.post_gate_proj(gate)) * self.post_up_proj(up))


class ColaMDecoderLayer(nn.Module):
    """One CoLA-M layer. Between layers flows (r-wide down activation, residual); the first layer takes the
    embeddings, the last returns the residual stream with its down projection added."""

    def __init__(self, config: ColaConfig, layer_idx: int):
        super().__init__()
        h, f, r, act = config.hidden_size, config.intermediate_size, config.rank, config.lr_act_type
        q_out = config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        self.layer_idx = layer_idx
        self.first, self.last = layer_idx == 0, layer_idx == config.num_hidden_layers - 1
        if not self.first:
            self.last_layer_post_mlp = _Factors(post_down_proj=ColaUp(f, h, r, bias=config.mlp_bias))
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.pre_attn = _Factors(pre_q_proj=ColaDown(h, q_out, r, act), pre_k_proj=ColaDown(h, kv_out, r, act),
                                 pre_v_proj=ColaDown(h, kv_out, r, act))
        self.self_attn = ColaMAttention(config, layer_idx)
        self.post_attn = _Factors(post_o_proj=ColaUp(q_out, h, r, bias=config.attention_bias))
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.pre_mlp = _Factors(pre_gate_proj=ColaDown(h, f, r, act), pre_up_proj=ColaDown(h, f, r, act))
        self.self_mlp = ColaMLowRankMLP(config)
        if self.last:
            self.post_mlp = _Factors(post_down_proj=ColaUp(f, h, r, bias=config.mlp_bias))

    def _attention_inputs(self, residual):
        x = self.input_layernorm(residual)
        a = self.pre_attn
        return a.pre_q_proj(x), a.pre_k_proj(x), a.pre_v_proj(x), residual

    def _enter(self, down, residual):
        """Segment 1: the previous layer's down B and residual add, the norm, q/k/v's A factors."""
        return self._attention_inputs(residual + self.last_layer_post_mlp.post_down_proj(down))

    def _after_attention(self, attended, residual):
        """Segment 3: o's B and residual add, the norm, gate/up's A factors."""
        residual = residual + self.post_attn.post_o_proj(attended)
        x = self.post_attention_layernorm(residual)
        return self.pre_mlp.pre_gate_proj(x), self.pre_mlp.pre_up_proj(x), residual

    def _exit(self, down, residual):
        """The last layer's segment 5: its own down B and residual add."""
        return residual + self.post_mlp.post_down_proj(down)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.first:
            query, key, value, residual = _segment(self._attention_inputs, hidden_states)
        else:
            query, key, value, residual = _segment(self._enter, *hidden_states)
        cos, sin = position_embeddings
        attended = _segment(self.self_attn, query, key, value, cos, sin, attention_mask)
        gate, up, residual = _segment(self._after_attention, attended, residual)
        down = _segment(self.self_mlp, gate, up)
        if self.last:
            return _segment(self._exit, down, residual)
        # HF LlamaModel hands each layer's output to the next layer as is: the pair flows between layers.
        return down, residual


class ColaMForCausalLM(LlamaForCausalLM):
    """CoLA-M: CoLA's parameters, decoder layers re-cut at the low-rank activations and recomputed in backward."""

    config_class = ColaMConfig

    def __init__(self, config: ColaMConfig):
        super().__init__(config)
        # The same random draws as CoLA (seeded alike, both start from the same values), moved to CoLA-M's layers.
        _make_bottlenecks(self, config)
        state = cola_m_state_from_cola(self.state_dict(), config.num_hidden_layers)
        with torch.device("meta"):
            self.model.layers = nn.ModuleList(ColaMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.load_state_dict(state, strict=True, assign=True)


# -- CoLA <-> CoLA-M checkpoints ---------------------------------------------------------------------------------

# (CoLA name inside layer l, CoLA-M name inside layer l); down_proj's B half moves to the next layer (below).
_SAME_LAYER = {
    **{f"self_attn.{p}_proj.cola_a": f"pre_attn.pre_{p}_proj.cola_a" for p in "qkv"},
    **{f"self_attn.{p}_proj.{w}": f"self_attn.post_{p}_proj.{w}" for p in "qkv" for w in ("cola_b", "bias")},
    "self_attn.o_proj.cola_a": "self_attn.pre_o_proj.cola_a",
    **{f"self_attn.o_proj.{w}": f"post_attn.post_o_proj.{w}" for w in ("cola_b", "bias")},
    **{f"mlp.{p}_proj.cola_a": f"pre_mlp.pre_{p}_proj.cola_a" for p in ("gate", "up")},
    **{f"mlp.{p}_proj.{w}": f"self_mlp.post_{p}_proj.{w}" for p in ("gate", "up") for w in ("cola_b", "bias")},
    "mlp.down_proj.cola_a": "self_mlp.pre_down_proj.cola_a",
}
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?layers\.)(?P<index>\d+)\.(?P<name>.+)$")


_COLA_NAME = {cola_m: cola for cola, cola_m in _SAME_LAYER.items()}


def _cola_m_key(key: str, layers: int) -> str:
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    prefix, index, name = match["prefix"], int(match["index"]), match["name"]
    if name in _SAME_LAYER:
        return f"{prefix}{index}.{_SAME_LAYER[name]}"
    if name.startswith("mlp.down_proj."):
        weight = name.removeprefix("mlp.down_proj.")
        if index == layers - 1:
            return f"{prefix}{index}.post_mlp.post_down_proj.{weight}"
        return f"{prefix}{index + 1}.last_layer_post_mlp.post_down_proj.{weight}"
    return key  # the norms keep their names


def _cola_key(key: str) -> str:
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    prefix, index, name = match["prefix"], int(match["index"]), match["name"]
    if name in _COLA_NAME:
        return f"{prefix}{index}.{_COLA_NAME[name]}"
    if name.startswith("last_layer_post_mlp.post_down_proj."):
        return f"{prefix}{index - 1}.mlp.down_proj.{name.removeprefix('last_layer_post_mlp.post_down_proj.')}"
    if name.startswith("post_mlp.post_down_proj."):
        return f"{prefix}{index}.mlp.down_proj.{name.removeprefix('post_mlp.post_down_proj.')}"
    return key


def cola_m_state_from_cola(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A CoLA state dict under CoLA-M's key map (the same tensors)."""
    return {_cola_m_key(key, layers): value for key, value in state.items()}


def cola_state_from_cola_m(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CoLA-M state dict under CoLA's key map (the same tensors)."""
    return {_cola_key(key): value for key, value in state.items()}


AutoConfig.register(ColaConfig.model_type, ColaConfig)
AutoConfig.register(ColaMConfig.model_type, ColaMConfig)
AutoModelForCausalLM.register(ColaConfig, ColaForCausalLM)
AutoModelForCausalLM.register(ColaMConfig, ColaMForCausalLM)
