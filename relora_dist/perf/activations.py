"""Bytes autograd keeps alive for backward, measured with `saved_tensors_hooks`.

Counted once per storage (views of one buffer share it) and never for parameters: what remains is the
activation memory a micro-batch adds on top of the static state (research/perf_model.md 2.2). Frozen W
is a parameter, so a frozen linear's saved input only counts if autograd really saves it.
"""

from __future__ import annotations

import torch
from torch import nn

from .accounting import PROJECTED_STATE


class SavedActivations:
    """`with SavedActivations(model) as saved: loss = model(...)` then `saved.bytes`."""

    def __init__(self, model: nn.Module):
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._parameter_storages and key not in self._seen and storage.nbytes() > 0:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_bytes_per_token(model: nn.Module, input_ids: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> float:
    """Saved-activation bytes per token of one training forward of a causal LM (labels = inputs)."""
    model.train()
    autocast = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(input_ids.device.type, enabled=False))
    with SavedActivations(model) as saved, autocast:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    del loss
    return saved.bytes / input_ids.numel()


def layer_bytes_per_token(hidden: int, ffn: int, heads: int, *, method: str, element_size: int, rank: int = 0,
                          dropout: bool = False, only_lr_act: bool = False) -> int:
    """Saved bytes per token of one decoder layer on torch's eager CPU path (measured exactly, see
    tests/test_perf_activations.py), by cost structure (`method`).

    Full rank (HF LLaMA): e(8h + 4ff) for the tensors saved in the compute dtype, 8h for RMSNorm's fp32 upcasts,
    4 per head for the attention log-sum-exp and 8 more per token. ReLoRA keeps all of that (A needs the input a
    frozen W does not), adds the r-wide intermediate of each of the 7 projections (7er), and with LoRA dropout the
    dropped inputs and the dropout noise, which the CPU path stores in the compute dtype: e(10h + ff).
    CoLA: a bottleneck keeps the input a linear keeps, plus x A (for σ's backward) and σ(x A) (for B's): 14er more
    than full rank, and e ff less with only_lr_act (no outer SiLU to differentiate). CoLA-M keeps only its segments'
    inputs: the residual stream twice and seven r-wide activations, e(2h + 7r). CR-Net, layers >= 1: full rank's, the
    r-wide x A of every projection, and the previous layer's outputs that β Y_prev needs for β's gradient where
    nothing else keeps them (q, k, o, down: 4h; v, gate and up are kept already), e(4h + 7r) more (and 14e bytes a
    layer for the β scalars, independent of the tokens). Layer 0 is a full-rank layer. CR-Net with its inverse
    recomputation keeps a rebuilding layer's input and attention output, e 2h (`crnet_recompute_layer_bytes`; the
    layers that keep the previous layer's outputs keep more).
    """
    e, h, f = element_size, hidden, ffn
    full = e * (8 * h + 4 * f) + 8 * h + 4 * heads + 8
    if method in ("full", *PROJECTED_STATE):  # GaLore / Fira train the full-rank model
        return full
    if method == "cola":
        return full + 14 * e * rank - (e * f if only_lr_act else 0)
    if method == "cola_m":
        return e * (2 * h + 7 * rank)
    if method == "crnet":
        return full + e * (4 * h + 7 * rank)
    if method == "crnet_recompute":
        return e * 2 * h
    return full + 7 * e * rank + (e * (10 * h + f) if dropout else 0)


def head_bytes_per_token(vocab_size: int) -> int:
    """The loss upcasts the logits to fp32 and keeps them for backward, whatever the compute dtype: 4 V."""
    return 4 * vocab_size


def crnet_recompute_layer_bytes(hidden: int, ffn: int, *, element_size: int, keeps_previous: bool,
                                kv_width: int | None = None) -> int:
    """Saved bytes per token of a CR-Net layer >= 1 under --crnet-recompute-every (measured exactly,
    tests/test_crnet.py): its input and its attention output, e 2h; or, in a layer that keeps the previous layer's 7
    outputs, its input and those (q h, k and v kv_width each, o h, gate and up ff each, down h)."""
    kv = hidden if kv_width is None else kv_width
    outputs = 3 * hidden + 2 * kv + 2 * ffn
    return element_size * (hidden + (outputs if keeps_previous else hidden))
