"""Bytes autograd keeps alive for backward, measured with `saved_tensors_hooks`.

Counted once per storage (views of one buffer share it) and never for parameters or buffers: what remains is the
activation memory a micro-batch adds on top of the static state (research/perf_model.md 2.2). Frozen W
is a parameter, so a frozen linear's saved input only counts if autograd really saves it.
"""

from __future__ import annotations

import torch
from torch import nn

from .accounting import CostTraits, check_traits


class SavedActivations:
    """`with SavedActivations(model) as saved: loss = model(...)` then `saved.bytes`."""

    def __init__(self, model: nn.Module):
        static = [*model.parameters(), *model.buffers()]  # module state (SST's index buffers), not activations
        self._parameter_storages = {t.untyped_storage().data_ptr() for t in static}
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


def layer_bytes_per_token(hidden: int, ffn: int, heads: int, *, traits: CostTraits, element_size: int, rank: int = 0,
                          dropout: bool = False, only_lr_act: bool = False, kv_width: int | None = None) -> int:
    """Saved bytes per token of one decoder layer on torch's eager CPU path (measured exactly, see
    tests/test_perf_activations.py), by the method's cost traits.

    Full rank (HF LLaMA): e(8h + 4ff) for the tensors saved in the compute dtype, 8h for RMSNorm's fp32 upcasts,
    4 per head for the attention log-sum-exp and 8 more per token. On top of that, by trait:
    - low-rank factors: the r-wide intermediate x A of each of the 7 projections, 7er (a frozen W's input is the
      tensor A needs anyway); as adapters with dropout (ReLoRA), the dropped inputs and the dropout noise, which the
      CPU path stores in the compute dtype, e(10h + ff);
    - σ between the factors (CoLA's bottleneck): σ(x A) as well, 7er more; only_lr_act (no outer SiLU to
      differentiate) e ff less;
    - carried outputs (CR-Net, layers >= 1): the previous layer's outputs that β Y_prev needs for β's gradient where
      nothing else keeps them (q, k, o, down), e 4h (and 14e bytes a layer for the β scalars, independent of the
      tokens); with a dense first layer, layer 0 is a full-rank layer;
    - a spectral basis (SST): each projection's x V, k = min(m, n) wide: e(5h + 2 kv) with kv the key/value width
      (`kv_width`, default h) for q, o, gate, up, down (k = h, as ff > h) and k, v;
    - recompute: only the recomputation's boundaries instead of all of the above: the layer's input and its
      attention output, e 2h (CR-Net's rebuilding layers, `crnet_recompute_layer_bytes`: the layers that keep the
      previous layer's outputs keep more); cut at the factors (CoLA-M) the 7 r-wide activations too, e(2h + 7r).
    """
    check_traits(traits)
    e, h, f = element_size, hidden, ffn
    if traits.recompute:
        return e * (2 * h + (7 * rank if traits.recompute_at_factors else 0))
    saved = e * (8 * h + 4 * f) + 8 * h + 4 * heads + 8
    if traits.low_rank_factors:
        saved += 7 * e * rank
    if traits.factor_activation:
        saved += 7 * e * rank
    if only_lr_act:
        saved -= e * f
    if traits.carried_outputs:
        saved += 4 * e * h
    if traits.spectral_basis:
        saved += e * (5 * h + 2 * (h if kv_width is None else min(kv_width, h)))
    if traits.adapters and dropout:
        saved += e * (10 * h + f)
    return saved


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
