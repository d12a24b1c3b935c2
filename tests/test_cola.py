"""CoLA and CoLA-M (relora_dist.architectures.cola): the oracles of research/peers_impl.md 5.5, on CPU in fp32."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from relora_dist.architectures.cola import (ColaForCausalLM, ColaLinear, ColaMForCausalLM, cola_config,
                                            cola_m_state_from_cola, cola_state_from_cola_m)
from relora_dist.models import llama_config
from relora_dist.methods import method_class
from relora_dist.perf.accounting import ModelCounts

VOCAB = 96


def small_config(*, memory_efficient=False, only_lr_act=False, rank=6, layers=3):
    base = llama_config("debug", vocab_size=VOCAB)
    base.num_hidden_layers = layers
    return cola_config(base, rank=rank, only_lr_act=only_lr_act, memory_efficient=memory_efficient)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].abs().max().clamp(min=1e-12)
        assert ((a[key] - b[key]).abs().max() / scale).item() < tol, key


def test_a_bottleneck_without_its_activation_is_the_linear_map_of_the_product():
    torch.manual_seed(0)
    cola = ColaLinear(12, 20, 5, bias=True, act="linear")
    dense = nn.Linear(12, 20)
    with torch.no_grad():
        dense.weight.copy_((cola.cola_a @ cola.cola_b).T)
        dense.bias.copy_(cola.bias)
    x = torch.randn(3, 7, 12, requires_grad=True)
    target = torch.randn(3, 7, 20)
    out_cola, out_dense = cola(x), dense(x)
    assert (out_cola - out_dense).abs().max() / out_dense.abs().max() < 1e-6
    (grad_x_cola,) = torch.autograd.grad((out_cola * target).sum(), x)
    (grad_x_dense, grad_w) = torch.autograd.grad((out_dense * target).sum(), (x, dense.weight))
    assert (grad_x_cola - grad_x_dense).abs().max() / grad_x_dense.abs().max() < 1e-6
    # Chain rule through W = (A B)^T: dA = dW^T B^T, dB = A^T dW^T.
    grad_a, grad_b = torch.autograd.grad((cola(x) * target).sum(), (cola.cola_a, cola.cola_b))
    assert torch.allclose(grad_a, grad_w.T @ cola.cola_b.T, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_b, cola.cola_a.T @ grad_w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("only_lr_act", [False, True])
def test_cola_m_equals_cola_in_loss_and_gradients_after_the_key_map(only_lr_act):
    torch.manual_seed(0)
    cola = ColaForCausalLM(small_config(only_lr_act=only_lr_act))
    cola_m = ColaMForCausalLM(small_config(memory_efficient=True, only_lr_act=only_lr_act))
    layers = cola.config.num_hidden_layers
    cola_m.load_state_dict(cola_m_state_from_cola(cola.state_dict(), layers), strict=True)
    tokens = torch.randint(0, VOCAB, (2, 24))
    loss = cola(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss_m = cola_m(input_ids=tokens, labels=tokens, use_cache=False).loss
    assert abs(loss.item() - loss_m.item()) <= 1e-6 * abs(loss.item())
    loss.backward()
    loss_m.backward()
    assert_close(cola_state_from_cola_m(grads(cola_m)), grads(cola), 1e-6)
    with torch.no_grad():  # and without recomputation (evaluation)
        assert torch.allclose(cola(input_ids=tokens).logits, cola_m(input_ids=tokens).logits, rtol=1e-5, atol=1e-6)


def test_cola_m_starts_from_the_values_cola_draws_from_the_same_seed():
    torch.manual_seed(3)
    cola = ColaForCausalLM(small_config())
    torch.manual_seed(3)
    cola_m = ColaMForCausalLM(small_config(memory_efficient=True))
    expected = cola_m_state_from_cola(cola.state_dict(), 3)
    assert all(torch.equal(value, expected[key]) for key, value in cola_m.state_dict().items())


def test_checkpoint_key_maps_are_inverse_and_move_down_projections_to_the_next_layer():
    cola = ColaForCausalLM(small_config())
    state = cola.state_dict()
    mapped = cola_m_state_from_cola(state, 3)
    assert mapped.keys() == ColaMForCausalLM(small_config(memory_efficient=True)).state_dict().keys()
    assert mapped["model.layers.1.last_layer_post_mlp.post_down_proj.cola_b"] is state["model.layers.0.mlp.down_proj.cola_b"]
    assert mapped["model.layers.2.post_mlp.post_down_proj.cola_b"] is state["model.layers.2.mlp.down_proj.cola_b"]
    assert "model.layers.0.last_layer_post_mlp.post_down_proj.cola_b" not in mapped
    assert cola_state_from_cola_m(mapped) == state


def test_only_lr_act_removes_exactly_the_mlps_outer_silu():
    torch.manual_seed(0)
    with_outer = ColaForCausalLM(small_config(only_lr_act=False))
    without = ColaForCausalLM(small_config(only_lr_act=True))
    without.load_state_dict(with_outer.state_dict())
    mlp, x = with_outer.model.layers[0].mlp, torch.randn(2, 5, with_outer.config.hidden_size)
    assert torch.equal(mlp(x), mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    other = without.model.layers[0].mlp
    assert torch.equal(other(x), other.down_proj(other.gate_proj(x) * other.up_proj(x)))
    def activations(model):  # every activation module the forward applies (Identity applies none)
        return sum(not isinstance(mod, nn.Identity) for name, mod in model.named_modules() if name.endswith(("act_fn", "lr_act")))

    layers = with_outer.config.num_hidden_layers
    assert activations(with_outer) == 8 * layers and activations(without) == 7 * layers


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_parameter_count_is_the_bottlenecks_plus_the_dense_parts(memory_efficient):
    config = small_config(memory_efficient=memory_efficient)
    model = AutoModelForCausalLM.from_config(config)
    h, f, r, layers = config.hidden_size, config.intermediate_size, config.rank, config.num_hidden_layers
    shapes = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]  # q, k, v, o, gate, up, down (in, out)
    expected = layers * sum(r * (m + n) for m, n in shapes) + 2 * VOCAB * h + (2 * layers + 1) * h
    assert sum(p.numel() for p in model.parameters()) == expected
    traits = method_class("cola_m" if memory_efficient else "cola").cost_traits
    counts = ModelCounts.from_config(config, rank=None, seq_len=16, traits=traits)
    assert counts.trainable(traits) == counts.held(traits) == expected


def test_defaults_follow_the_official_configs():
    for preset, rank, only_lr_act in (("60m", 128, False), ("130m", 256, False), ("350m", 256, True), ("1b", 512, True),
                                      ("9m", 32, False)):
        config = cola_config(llama_config(preset, vocab_size=VOCAB), rank=None, only_lr_act=None)
        assert (config.rank, config.only_lr_act) == (rank, only_lr_act), preset
