"""Presets, parameter counts from shapes, and the Control sizing."""

import pytest

import relora_dist as rd
from relora_dist.models import (PRESETS, build_model, control_config, count_parameters, llama_config,
                                relora_trainable_parameters)


@pytest.mark.parametrize("preset", ["debug", "tiny", "9m"])
def test_counts_from_shapes_match_the_built_model(preset):
    config = llama_config(preset, vocab_size=1000)
    model = build_model(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    rd.wrap(model, rd.ReLoRAConfig(rank=8, merge_every=10, restart_warmup_steps=1))
    assert relora_trainable_parameters(config, 8) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_presets_and_aliases():
    c = llama_config("llama_1b", vocab_size=32100)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (2048, 5461, 24, 32)
    assert 1.3e9 < count_parameters(c) < 1.4e9  # "1.3B"
    assert {"9m", "20m", "35m", "60m", "130m", "250m", "350m", "1b", "3b", "7b"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown model preset"):
        llama_config("13b", vocab_size=100)


def test_control_matches_relora_trainable_size():
    config = llama_config("130m", vocab_size=32100)
    target = relora_trainable_parameters(config, 128)
    control = control_config(config, 128)
    assert control.num_hidden_layers == config.num_hidden_layers
    assert abs(count_parameters(control) - target) < 0.005 * target
