"""CR-Net (relora_dist.architectures.crnet): the oracles of research/peers_impl.md 6.3, on CPU in fp32."""

import pytest
import torch
from torch import nn

from relora_dist.architectures.crnet import PROJECTIONS, CRNetForCausalLM, CRNetLinear, crnet_config, effective_beta
from relora_dist.models import llama_config
from relora_dist.methods import method_class
from relora_dist.perf.accounting import ModelCounts

VOCAB, LAYERS = 96, 4


def small_model(*, epsilon=1e-3, seed=0, randomise=True, layers=LAYERS, recompute_every=0, beta=(-1.2, 1.2), b_std=0.3):
    base = llama_config("debug", vocab_size=VOCAB)
    base.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = CRNetForCausalLM(crnet_config(base, rank=5, epsilon=epsilon, beta_init=1.0, recompute_every=recompute_every))
    if randomise:  # B starts at zero and β at 1: give every term a value of its own
        draw = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, CRNetLinear):
                    module.cr_b.copy_(torch.randn(module.cr_b.shape, generator=draw) * b_std)
                    module.beta.uniform_(*beta, generator=draw)
    return model


def captured_projections(model, tokens):
    """Per layer, per projection: (its input X, its output Y) in one forward."""
    seen = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, key=(layer, name): seen.__setitem__(key, (args[0], out)))
             for layer, block in enumerate(model.model.layers) for name, module in zip(PROJECTIONS, block.projections())]
    with torch.no_grad():
        model(input_ids=tokens)
    for hook in hooks:
        hook.remove()
    return seen


def test_the_streamed_outputs_equal_the_unrolled_closed_form():
    """Y_l = (prod_{k=1..l} b_k) Y_0 + sum_{j=1..l} (prod_{k=j+1..l} b_k) X_j A_j B_j, b = β̃ (layers counted from 0)."""
    model = small_model()
    seen = captured_projections(model, torch.randint(0, VOCAB, (2, 12)))
    for p, name in enumerate(PROJECTIONS):
        modules = [block.projections()[p] for block in model.model.layers]

        def carry(after: int, upto: int) -> torch.Tensor:  # prod of b_k for after < k <= upto
            out = torch.tensor(1.0)
            for k in range(after + 1, upto + 1):
                out = out * effective_beta(modules[k].beta, modules[k].epsilon).detach()
            return out

        for layer in range(1, LAYERS):
            closed = carry(0, layer) * seen[0, name][1]
            for j in range(1, layer + 1):
                closed = closed + carry(j, layer) * modules[j].low_rank(seen[j, name][0]).detach()
            got = seen[layer, name][1]
            assert (got - closed).abs().max() / got.abs().max() < 1e-5, (layer, name)


def test_the_inverse_rebuilds_the_previous_layers_outputs():
    model = small_model()
    seen = captured_projections(model, torch.randint(0, VOCAB, (2, 12)))
    for layer in range(1, LAYERS):
        for module, name in zip(model.model.layers[layer].projections(), PROJECTIONS):
            x, y = seen[layer, name]
            stored = seen[layer - 1, name][1]
            with torch.no_grad():
                rebuilt = module.previous_output(y, x)
            assert (rebuilt - stored).abs().max() / stored.abs().max() < 1e-5, (layer, name)


def test_beta_and_epsilon_zero_leave_a_pure_low_rank_map():
    module = CRNetLinear(7, 9, crnet_config(llama_config("debug", vocab_size=VOCAB), rank=3, epsilon=0.0, beta_init=0.0))
    with torch.no_grad():
        module.cr_b.normal_()
    x, previous = torch.randn(4, 7), torch.randn(4, 9)
    assert torch.equal(module(x, previous), x @ module.cr_a @ module.cr_b)
    assert effective_beta(torch.tensor(-0.5), 0.01).item() == pytest.approx(-0.51)
    assert effective_beta(torch.tensor(0.0), 0.01).item() == pytest.approx(0.01)


def test_layer_zero_is_hf_llamas_and_the_rest_count_r_times_in_plus_out():
    model = small_model(randomise=False)
    config = model.config
    h, f, r = config.hidden_size, config.intermediate_size, config.rank
    shapes = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]
    dense_layer = sum(m * n for m, n in shapes)
    low_rank = (LAYERS - 1) * (sum(r * (m + n) for m, n in shapes) + len(PROJECTIONS))  # + one β a projection
    expected = dense_layer + low_rank + 2 * VOCAB * h + (2 * LAYERS + 1) * h
    assert sum(p.numel() for p in model.parameters()) == expected
    traits = method_class("crnet").cost_traits
    assert ModelCounts.from_config(config, rank=None, seq_len=8, traits=traits).trainable(traits) == expected
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert "model.layers.0.mlp.down_proj.weight" in model.state_dict()


def test_every_parameter_trains_from_the_third_update():
    """B starts at zero, so the first update moves only o's and down's B (and β): their inputs see no gradient yet.
    The second reaches q/k/v's and gate/up's B, the third every A and norm of layers >= 1."""
    model = small_model(randomise=False)
    tokens = torch.randint(0, VOCAB, (2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() > 0)


def gradients(recompute_every: int, tokens) -> tuple[float, dict]:
    # β near its start and B small, as in training; the inverse divides by β̃ once a layer
    model = small_model(layers=6, recompute_every=recompute_every, beta=(0.8, 1.2), b_std=0.1)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert model.model.layers[0].rebuilt == {}  # every handed-down output was taken
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("every, tolerance", [(1, 0.0), (2, 1e-5), (3, 1e-5), (6, 1e-5)])
def test_inverse_recomputation_gives_plain_autograds_gradients(every, tolerance):
    """Every layer kept (1): bit for bit. Longer inverse chains: the rebuilt outputs carry the inverse's rounding
    (measured 1.2e-6 to 3.5e-6 relative for 2 to 6 layers between kept ones)."""
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    plain_loss, plain = gradients(0, tokens)
    loss, recomputed = gradients(every, tokens)
    assert loss == plain_loss
    worst = max(((recomputed[k] - plain[k]).abs().max() / plain[k].abs().max().clamp(min=1e-12)).item() for k in plain)
    assert worst <= tolerance


def test_inverse_recomputation_keeps_two_hidden_wide_tensors_a_token_in_the_layers_that_rebuild():
    """Forward-time saved bytes of layers >= 1 (between 4 and 6 layers): the input and the attention output, e 2h; with
    every layer keeping the outputs it was given, e(h + the 7 outputs' widths) = e(6h + 2ff) here."""
    from relora_dist.perf.activations import SavedActivations, crnet_recompute_layer_bytes

    tokens = torch.randint(0, VOCAB, (2, 12))
    for every, keeps in ((100, False), (1, True)):
        saved = []
        for layers in (4, 6):
            model = small_model(layers=layers, recompute_every=every, randomise=False)
            with SavedActivations(model) as counter:
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            saved.append(counter.bytes)
        config = model.config
        per_layer = (saved[1] - saved[0]) / 2 / tokens.numel()
        assert per_layer == crnet_recompute_layer_bytes(config.hidden_size, config.intermediate_size, element_size=4,
                                                        keeps_previous=keeps)
