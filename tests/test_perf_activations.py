"""Saved-activation bytes per token, measured with saved_tensors_hooks on the real HF LLaMA, against the
per-layer formula the memory profiler and the performance model use. Shapes here were not used to derive it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import relora_dist as rd
from relora_dist.architectures.cola import cola_config
from relora_dist.architectures.crnet import crnet_config
from relora_dist.methods import method_class
from relora_dist.methods.sst.layer import wrap_sst
from relora_dist.models import llama_config_from_shape
from relora_dist.perf.activations import (SavedActivations, crnet_recompute_layer_bytes, head_bytes_per_token,
                                          layer_bytes_per_token)

HIDDEN, FFN, HEADS, RANK, BATCH, SEQ = 48, 136, 6, 6, 3, 24


def traits(method: str):
    """The cost traits the registered method declares (what the formula is computed by)."""
    return method_class(method).cost_traits


def saved_bytes(layers, *, method, dtype, dropout=0.0, vocab=113, only_lr_act=False):
    torch.manual_seed(0)
    config = llama_config_from_shape(HIDDEN, FFN, layers, HEADS, vocab_size=vocab, max_positions=64)
    if method in ("cola", "cola_m"):
        config = cola_config(config, rank=RANK, only_lr_act=only_lr_act, memory_efficient=method == "cola_m")
    if method == "crnet":
        config = crnet_config(config, rank=RANK, epsilon=1e-3, beta_init=1.0)
    model = AutoModelForCausalLM.from_config(config)
    if method == "relora":
        rd.wrap(model, rd.ReLoRAConfig(rank=RANK, alpha=8, dropout=dropout, fused_kernels="off"))
    if method == "sst":
        wrap_sst(model, rank=RANK, generator=torch.Generator().manual_seed(0), rule="sigma")
    model = model.to(dtype).train()
    tokens = torch.randint(0, vocab, (BATCH, SEQ))
    with SavedActivations(model) as saved:
        model(input_ids=tokens, labels=tokens).loss.backward()  # backward runs: nothing new may be saved by it
    return saved.bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, dropout", [("full", 0.0), ("relora", 0.0), ("relora", 0.1), ("sst", 0.0)])
def test_layer_bytes_per_token_are_exact(method, dropout, dtype):
    per_layer = (saved_bytes(3, method=method, dtype=dtype, dropout=dropout)
                 - saved_bytes(1, method=method, dtype=dtype, dropout=dropout)) / 2 / (BATCH * SEQ)
    e = torch.finfo(dtype).bits // 8
    assert per_layer == layer_bytes_per_token(HIDDEN, FFN, HEADS, traits=traits(method), element_size=e, rank=RANK,
                                              dropout=dropout > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, only_lr_act", [("cola", False), ("cola", True), ("cola_m", False), ("cola_m", True)])
def test_cola_layer_bytes_per_token_are_exact(method, only_lr_act, dtype):
    per_layer = (saved_bytes(3, method=method, dtype=dtype, only_lr_act=only_lr_act)
                 - saved_bytes(1, method=method, dtype=dtype, only_lr_act=only_lr_act)) / 2 / (BATCH * SEQ)
    e = torch.finfo(dtype).bits // 8
    assert per_layer == layer_bytes_per_token(HIDDEN, FFN, HEADS, traits=traits(method), element_size=e, rank=RANK,
                                              only_lr_act=only_lr_act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crnet_layer_bytes_are_exact(dtype):
    """Layers >= 1 (layers 2 and 3 of 4); their 7 β scalars add 14 e bytes a layer whatever the tokens."""
    e = torch.finfo(dtype).bits // 8
    per_layer = (saved_bytes(4, method="crnet", dtype=dtype) - saved_bytes(2, method="crnet", dtype=dtype)) / 2
    expected = layer_bytes_per_token(HIDDEN, FFN, HEADS, traits=traits("crnet"), element_size=e, rank=RANK)
    assert per_layer == expected * BATCH * SEQ + 14 * e
    first = saved_bytes(2, method="crnet", dtype=dtype) - saved_bytes(1, method="crnet", dtype=dtype)
    assert first == per_layer  # the second layer of 2 is a CR-Net layer too; layer 0 is a full-rank layer


def test_crnet_recompute_keeps_a_rebuilding_layers_two_tensors():
    """With its inverse recomputation a CR-Net layer keeps its input and its attention output (measured in
    tests/test_crnet.py), not the adapters' r-wide intermediates nor any dropout state."""
    from relora_dist.train.config import standalone_method

    recompute = standalone_method("crnet", recompute_every=2).cost_traits
    for e in (2, 4):
        rebuilding = crnet_recompute_layer_bytes(HIDDEN, FFN, element_size=e, keeps_previous=False)
        for dropout in (False, True):
            assert layer_bytes_per_token(HIDDEN, FFN, HEADS, traits=recompute, element_size=e, rank=RANK,
                                         dropout=dropout) == rebuilding == 2 * e * HIDDEN


def test_cola_m_saves_less_than_cola_by_the_segment_accounting_and_the_same_outside_the_layers():
    """Whole models: CoLA-M's recomputation saves L (cola - cola_m) layer bytes per token, nothing else changes."""
    for layers in (1, 3):
        cola, cola_m = (saved_bytes(layers, method=m, dtype=torch.float32) / (BATCH * SEQ) for m in ("cola", "cola_m"))
        per_layer = [layer_bytes_per_token(HIDDEN, FFN, HEADS, traits=traits(m), element_size=4, rank=RANK) for m in ("cola", "cola_m")]
        assert cola - cola_m == pytest.approx(layers * (per_layer[0] - per_layer[1]), abs=1e-9)


def test_head_bytes_grow_with_the_vocabulary():
    grown = saved_bytes(1, method="full", dtype=torch.bfloat16, vocab=213) - saved_bytes(1, method="full", dtype=torch.bfloat16)
    assert grown == (head_bytes_per_token(213) - head_bytes_per_token(113)) * BATCH * SEQ


def test_frozen_weights_and_parameters_are_not_counted():
    """ReLoRA without dropout saves only the r-wide intermediates more than full rank: the frozen W's input is the
    same tensor A needs, and no parameter (W, A, B) is counted as an activation."""
    extra = saved_bytes(1, method="relora", dtype=torch.float32) - saved_bytes(1, method="full", dtype=torch.float32)
    assert extra == 7 * 4 * RANK * BATCH * SEQ
