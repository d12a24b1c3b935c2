"""LLaMA presets (SPEC section 5) as HF LlamaConfig, the Control model sizing, and the HF model writer."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, LlamaConfig, LlamaForCausalLM

# name: (hidden, ffn, layers, heads). "tiny" and "debug" are CPU-sized flavours for tests and the demo.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "debug": (32, 88, 2, 2),
    "tiny": (128, 352, 2, 4),
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 6, 8),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "250m": (768, 2560, 24, 16),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "3b": (2560, 6848, 32, 32),
    "7b": (4096, 11008, 32, 32),
}


# The projections of a LLaMA decoder layer, attention then MLP: what low-rank methods re-parameterise or replace.
LLAMA_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS, MLP_PROJECTIONS = LLAMA_PROJECTIONS[:4], LLAMA_PROJECTIONS[4:]

# Sibling projections of one block that read the same input tensor (HF LLaMA and the models built like it):
# ReLoRA's shared_lora_input gives each group one dropout mask and one down-projection GEMM.
SHARED_INPUT_PROJECTIONS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _normalise(name: str) -> str:
    return name.removeprefix("llama_").removeprefix("llama-").lower()


def llama_config(preset: str | None, *, vocab_size: int, config_path: str | None = None, max_positions: int = 1024) -> LlamaConfig:
    """A preset, or any HF LLaMA config JSON (its vocab is replaced by the tokenizer's)."""
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"model config not found: {config_path} (--model-config)")
        try:
            cfg = LlamaConfig(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"model config {config_path} is not a LLaMA config JSON: {e}") from None
        cfg.vocab_size = vocab_size
        return cfg
    key = _normalise(preset or "")
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)} (--model)")
    hidden, ffn, layers, heads = PRESETS[key]
    return llama_config_from_shape(hidden, ffn, layers, heads, vocab_size=vocab_size, max_positions=max_positions)


def llama_config_from_shape(hidden: int, ffn: int, layers: int, heads: int, *, vocab_size: int, max_positions: int = 1024) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config)


def decoder_layers(model) -> list:
    """The repeated blocks of a causal LM (HF LLaMA and the models built like it: model.model.layers): what FSDP2
    shards one by one and --compile compiles one by one."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers (the decoder layers)")
    return list(layers)


def causal_lm_loss(model, tokens):
    """Mean next-token loss of `tokens` (labels are the inputs, shifted inside the model). No KV cache: training
    never reads one, and building it cost 10-15% of a 9m forward+backward on a CPU (same loss, bit for bit)."""
    return model(input_ids=tokens, labels=tokens, use_cache=False).loss


def config_from_dict(values: dict):
    """A model config saved with `to_dict()` (model_config.json), as its own class: LLaMA, or an architecture a method
    builds (`relora_dist.architectures`, registered with transformers' AutoConfig)."""
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type", "llama"), **values)


def save_hf_model(state: dict, config: LlamaConfig, tokenizer, out_dir: str | Path) -> Path:
    """A model directory `AutoModelForCausalLM.from_pretrained` loads: `state` (the plain model's keys, all of them)
    as safetensors, the config and the tokenizer. Another architecture than LLaMA needs `import relora_dist` first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The class itself, not from_config: inside a ZeRO-3 Trainer run from_config builds under deepspeed.zero.Init,
    # whose collectives would wait for ranks that write nothing.
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def count_parameters(config: LlamaConfig) -> int:
    """Total parameters of a LLaMA config, computed from shapes (no allocation)."""
    h, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + L * per_layer + h + head


def relora_trainable_parameters(config: LlamaConfig, rank: int) -> int:
    """Parameters ReLoRA trains: A/B of the 7 projections + embeddings, head and norms."""
    h, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out)
    lora = L * sum(rank * (i + o) for i, o in shapes)
    head = 0 if config.tie_word_embeddings else v * h
    return lora + v * h + head + L * 2 * h + h


def control_config(config: LlamaConfig, rank: int) -> LlamaConfig:
    """A full-rank model with the same depth, heads and ffn ratio whose size is closest to what ReLoRA trains."""
    target = relora_trainable_parameters(config, rank)
    heads = config.num_attention_heads
    ratio = config.intermediate_size / config.hidden_size
    best = None
    for hidden in range(heads * 2, config.hidden_size + 1, heads * 2):  # even head dim for rotary
        candidate = llama_config_from_shape(
            hidden, max(1, round(hidden * ratio)), config.num_hidden_layers, heads,
            vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
        )
        gap = abs(count_parameters(candidate) - target)
        if best is None or gap < best[0]:
            best = (gap, candidate)
    if best is None:
        raise ValueError(f"cannot size a Control model below hidden {config.hidden_size} with {heads} heads")
    control = best[1]
    # Hidden sizes move in coarse steps (embeddings scale with them); the ffn width fine-tunes the count.
    per_ffn_unit = 3 * control.hidden_size * control.num_hidden_layers
    control.intermediate_size = max(1, control.intermediate_size + round((target - count_parameters(control)) / per_ffn_unit))
    return control
