"""What the architectures share with HF LLaMA: its shape (`llama_shape`), and its attention between the projections
for decoder layers that compute the projections themselves (CoLA-M, CR-Net): the same rotary embedding and the
attention kernel transformers is configured with (sdpa)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward


def llama_shape(base) -> dict:
    """A LLaMA config's values without its identity (model type, architectures, version), for another config class."""
    return {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}


class AttentionCore(nn.Module):
    """What transformers' attention kernels read from the module that calls them (as HF LlamaAttention has it)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """q/k/v projection outputs (batch, seq, heads x head_dim) -> the attention output o_proj reads."""
        input_shape = query.shape[:-1]
        heads = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(heads).transpose(1, 2) for t in (query, key, value))
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = kernel(self, query, key, value, attention_mask, scaling=self.scaling,
                        dropout=self.attention_dropout if self.training else 0.0)
        return out.reshape(*input_shape, -1).contiguous()
