"""Saved-activation bytes per token, measured with saved_tensors_hooks on the real HF LLaMA, against the
per-layer formula the memory profiler and the performance model use. Shapes here were not used to derive it."""

import pytest
import torch

import relora_dist as rd
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.perf.activations import SavedActivations, head_bytes_per_token, layer_bytes_per_token

HIDDEN, FFN, HEADS, RANK, BATCH, SEQ = 48, 136, 6, 6, 3, 24


def saved_bytes(layers, *, method, dtype, dropout=0.0, vocab=113):
    torch.manual_seed(0)
    model = build_model(llama_config_from_shape(HIDDEN, FFN, layers, HEADS, vocab_size=vocab, max_positions=64))
    if method == "relora":
        rd.wrap(model, rd.ReLoRAConfig(rank=RANK, alpha=8, dropout=dropout, fused_kernels="off"))
    model = model.to(dtype).train()
    tokens = torch.randint(0, vocab, (BATCH, SEQ))
    with SavedActivations(model) as saved:
        model(input_ids=tokens, labels=tokens).loss.backward()  # backward runs: nothing new may be saved by it
    return saved.bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, dropout", [("full", 0.0), ("relora", 0.0), ("relora", 0.1)])
def test_layer_bytes_per_token_are_exact(method, dropout, dtype):
    per_layer = (saved_bytes(3, method=method, dtype=dtype, dropout=dropout)
                 - saved_bytes(1, method=method, dtype=dtype, dropout=dropout)) / 2 / (BATCH * SEQ)
    e = torch.finfo(dtype).bits // 8
    assert per_layer == layer_bytes_per_token(HIDDEN, FFN, HEADS, method=method, element_size=e, rank=RANK,
                                              dropout=dropout > 0)


def test_head_bytes_grow_with_the_vocabulary():
    grown = saved_bytes(1, method="full", dtype=torch.bfloat16, vocab=213) - saved_bytes(1, method="full", dtype=torch.bfloat16)
    assert grown == (head_bytes_per_token(213) - head_bytes_per_token(113)) * BATCH * SEQ


def test_frozen_weights_and_parameters_are_not_counted():
    """ReLoRA without dropout saves only the r-wide intermediates more than full rank: the frozen W's input is the
    same tensor A needs, and no parameter (W, A, B) is counted as an activation."""
    extra = saved_bytes(1, method="relora", dtype=torch.float32) - saved_bytes(1, method="full", dtype=torch.float32)
    assert extra == 7 * 4 * RANK * BATCH * SEQ
