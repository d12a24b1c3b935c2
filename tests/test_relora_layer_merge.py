"""ReLoRALinear, wrap, and merge/re-init on a replicated model (invariants I1, I2, I3-local)."""

import math

import pytest
import torch
from torch import nn

import relora_dist as rd
from relora_dist.access import external_parameters
from relora_dist.models import build_model, llama_config_from_shape


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return build_model(llama_config_from_shape(32, 88, 2, 2, vocab_size=97, max_positions=64))


def test_wrap_replaces_targets_and_freezes_only_W():
    model = tiny_llama()
    w_before = model.model.layers[0].self_attn.q_proj.weight
    rd.wrap(model, rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=1))
    layers = rd.relora_layers(model)
    assert len(layers) == 2 * 7
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, rd.ReLoRALinear) and q.weight is w_before  # shared, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.endswith(".weight") and "proj" in n for n in frozen) and len(frozen) == 14
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= trainable
    assert "model.layers.0.self_attn.q_proj.lora_A" in trainable
    # state dict keeps HF names for W (export maps back trivially) and has no bias HF lacks
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert not any(k.endswith("proj.bias") for k in model.state_dict())


def test_wrap_errors():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, target_modules=("nonexistent",), merge_every=10, restart_warmup_steps=1))
    with pytest.raises(ValueError, match=r"rank 64 is invalid .* \[1, 32\]"):
        rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=64, merge_every=10, restart_warmup_steps=1))


def test_init_is_kaiming_A_zero_B_and_B_gets_gradient():
    """I2: the reference zeroed both factors, so its first cycle learned nothing."""
    model = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, dropout=0.0, merge_every=10, restart_warmup_steps=1))
    layer = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert layer.lora_B.abs().max() == 0
    x = torch.randint(0, 97, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    for layer in rd.relora_layers(model):
        assert layer.lora_B.grad.abs().sum() > 0
        assert layer.lora_A.grad.abs().sum() == 0  # B = 0


def test_forward_equals_dense_with_delta():
    torch.manual_seed(1)
    layer = rd.ReLoRALinear(12, 10, rank=3, alpha=6.0, bias=True, relora_name="x")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    dense = x @ (layer.weight.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()).T + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), dense, rtol=1e-5, atol=1e-5)


def _loss_and_lora_grads(model, tokens):
    torch.manual_seed(7)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad for _, p in rd.lora_parameters(model)]


def test_shared_lora_input_groups_qkv_and_gate_up_and_changes_nothing_without_dropout():
    """One GEMM x [A_q; A_k; A_v]^T per group is the same function as one per module (float rounding apart)."""
    models = {}
    for shared in (False, True):
        model = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, dropout=0.0, merge_every=10, restart_warmup_steps=1,
                                                      shared_lora_input=shared))
        torch.manual_seed(5)
        for layer in rd.relora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.1)
        models[shared] = model
    attn, mlp = models[True].model.layers[0].self_attn, models[True].model.layers[0].mlp
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not attn.q_proj.shared_input
    assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None  # their inputs are their own
    assert [p for m, p in external_parameters(models[True]) if m is attn.k_proj] == [attn.q_proj.lora_A, attn.v_proj.lora_A]
    assert all(layer.shared_input is None for layer in rd.relora_layers(models[False]))
    tokens = torch.randint(0, 97, (2, 16))
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_lora_grads(models[s], tokens) for s in (False, True))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not attn.q_proj.shared_input._pending and not mlp.up_proj.shared_input._pending  # nothing held after a forward


def test_shared_lora_input_draws_one_dropout_mask_per_group():
    model = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, dropout=0.5, merge_every=10, restart_warmup_steps=1,
                                                  shared_lora_input=True))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            proj.lora_A.copy_(attn.q_proj.lora_A)
    x = torch.randn(3, 5, 32)
    t = [proj.shared_input.down_projection(proj, x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])  # one mask: equal A give equal t
    assert not torch.equal(t[0], x @ attn.q_proj.lora_A.T)  # and the mask is there
    own = [proj.down_projection(x) for proj in (attn.q_proj, attn.k_proj)]
    assert not torch.equal(own[0], own[1])  # per-module masks differ
    # a pass cut short (q only) leaves k's and v's columns; the next pass starts at q again and computes anew
    attn.q_proj.shared_input.down_projection(attn.q_proj, x)
    model.eval()
    other = torch.randn(3, 5, 32)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        torch.testing.assert_close(proj.shared_input.down_projection(proj, other), other @ proj.lora_A.T)


def _train_a_bit(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randint(0, 97, (2, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_merge_preserves_function_and_reinits():
    """I1: logits right after merge_and_reinit equal those before; A re-drawn, B zero; second merge is a no-op."""
    model = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, dropout=0.0, merge_every=10, restart_warmup_steps=1))
    _train_a_bit(model)
    model.eval()
    x = torch.randint(0, 97, (2, 16))
    before = model(input_ids=x).logits
    layer = model.model.layers[1].self_attn.v_proj
    A_old = layer.lora_A.detach().clone()
    expected_W = layer.weight.detach().double() + layer.scale * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    assert layer.lora_B.abs().sum() > 0
    rd.merge_and_reinit(model, restart_index=1)
    after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.double(), expected_W, rtol=1e-6, atol=1e-7)
    assert layer.lora_B.abs().sum() == 0 and not torch.equal(layer.lora_A, A_old)
    W_after_first = layer.weight.detach().clone()
    rd.merge_and_reinit(model, restart_index=2)
    assert torch.equal(layer.weight, W_after_first)


def test_reinit_is_keyed_not_global_rng():
    """Same (seed, restart, name) gives the same A whatever the global RNG did (no replica drift)."""
    a = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=1))
    b = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=1))
    torch.manual_seed(123)
    rd.merge_and_reinit(a, restart_index=2)
    torch.rand(1000)
    rd.merge_and_reinit(b, restart_index=2)
    for la, lb in zip(rd.relora_layers(a), rd.relora_layers(b)):
        assert torch.equal(la.lora_A, lb.lora_A)
    names = [l.relora_name for l in rd.relora_layers(a)]
    As = [l.lora_A for l in rd.relora_layers(a)]
    assert not torch.equal(As[0][:, :32], As[1][:, :32]), names[:2]  # different modules, different draws


def test_merge_refuses_non_finite_and_leaves_W():
    model = rd.wrap(tiny_llama(), rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=1))
    layers = rd.relora_layers(model)
    W = [l.weight.detach().clone() for l in layers]
    with torch.no_grad():
        layers[-1].lora_B[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        rd.merge_and_reinit(model, restart_index=1)
    assert all(torch.equal(l.weight, w) for l, w in zip(layers, W))


def test_merge_of_flat_pieces_matches_full_merge():
    """The sharded-merge math: adding s*B@A only on flat ranges (as ZeRO-3/FSDP2 will) equals the full merge."""
    from relora_dist.access import Piece, ReplicatedAccess
    from relora_dist.methods.relora.merge import merge_and_reinit_layers

    torch.manual_seed(0)
    layer = rd.ReLoRALinear(7, 5, rank=2, alpha=4.0, relora_name="m")
    with torch.no_grad():
        layer.lora_B.normal_()
    full = layer.weight.detach() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()

    class TwoPieces(ReplicatedAccess):
        def param_pieces(self, p):
            if p is not layer.weight:
                return super().param_pieces(p)
            flat = p.data.view(-1)
            return [Piece(0, [flat[:13]]), Piece(13, [flat[13:22]]), Piece(22, [flat[22:]])]

    merge_and_reinit_layers([layer], TwoPieces(), restart_index=1)
    torch.testing.assert_close(layer.weight.detach(), full, rtol=1e-6, atol=1e-7)


def test_bf16_weight_merges_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    layer = rd.ReLoRALinear(16, 8, rank=4, alpha=4.0, relora_name="b", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = (layer.weight.float() + layer.scale * layer.lora_B.float() @ layer.lora_A.float()).to(torch.bfloat16)
    rd.merge_and_reinit(nn.Sequential(layer), restart_index=1)
    assert torch.equal(layer.weight, expected)
