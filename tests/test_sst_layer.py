"""SST's layer and its events (on one process's access layer) against the research note's oracles
(shared/research/sst.md, section 4): the factorisation, the enhanced gradient in fp64 against autograd, a resample's
bitwise no-op with the moments zeroed, the step's clamp and unit columns, the re-SVD, and the sampling rules."""

import pytest
import torch
from torch import nn

from relora_dist.access import ReplicatedAccess
from relora_dist.methods.sst.events import column_sums_of_squares, project, redecompose, resample
from relora_dist.methods.sst.layer import SSTLinear, forward_flops, pick_forward, sample_components, sampling_weights


def layer(m=12, n=9, rank=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(n, m, bias=True).to(dtype)
    return linear, SSTLinear(linear, rank=rank, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, n", [(12, 9), (9, 12)])
def test_the_factorisation_is_the_weight_and_the_outputs_are_the_linears(m, n):
    linear, sst = layer(m, n)
    assert (sst.dense_weight() - linear.weight).norm() <= 1e-6 * linear.weight.norm()
    x = torch.randn(2, 5, n)
    assert torch.allclose(sst(x), linear(x), rtol=1e-5, atol=1e-6)
    assert sst.U.shape == (m, min(m, n)) and sst.V.shape == (n, min(m, n)) and sst.active.unique().numel() == 3


def test_the_enhanced_gradients_are_autograds_without_the_sigma_factor_in_fp64():
    _, sst = layer(dtype=torch.float64)
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 12, dtype=torch.float64)
    (sst(x) * target).sum().backward()
    # autograd through the plain product, the same tensors
    u_active, v_active = sst.U_active.detach().clone().requires_grad_(), sst.V_active.detach().clone().requires_grad_()
    sigma, x_plain = sst.sigma.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    u = sst.U.index_copy(1, sst.active, u_active)
    v = sst.V.index_copy(1, sst.active, v_active)
    (((x_plain @ v * sigma) @ u.T + sst.bias) * target).sum().backward()
    chosen = sigma.detach()[sst.active]
    assert torch.allclose(sst.sigma.grad, sigma.grad, rtol=1e-12) and torch.allclose(x.grad, x_plain.grad, rtol=1e-12)
    assert torch.allclose(sst.U_active.grad, u_active.grad / chosen, rtol=1e-10)
    assert torch.allclose(sst.V_active.grad, v_active.grad / chosen, rtol=1e-10)
    # and the formulas: G = dH^T X, dsigma_i = u_i^T G v_i, G V_S, G^T U_S
    g = target.reshape(-1, 12).T @ x.detach().reshape(-1, 9)
    assert torch.allclose(sst.sigma.grad, torch.einsum("mk,mn,nk->k", u.detach(), g, v.detach()), rtol=1e-10)
    assert torch.allclose(sst.U_active.grad, g @ v.detach()[:, sst.active], rtol=1e-10)
    assert torch.allclose(sst.V_active.grad, g.T @ u.detach()[:, sst.active], rtol=1e-10)
    assert sst.U_active.grad.abs().sum() > 0 and sst.V_active.grad.abs().sum() > 0  # no saddle at the start


def test_the_dense_forward_computes_the_factored_ones_outputs_and_gradients_in_fp64():
    torch.manual_seed(0)
    linear = nn.Linear(9, 12).double()
    layers = {mode: SSTLinear(linear, rank=3, generator=torch.Generator().manual_seed(0), forward=mode)
              for mode in ("factored", "dense")}
    x, target = torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    grads = {}
    for mode, sst in layers.items():
        inputs = x.clone().requires_grad_()
        (sst(inputs) * target).sum().backward()
        grads[mode] = [inputs.grad] + [p.grad for p in (sst.sigma, sst.U_active, sst.V_active)]
    assert layers["dense"].dense and not layers["factored"].dense
    assert torch.allclose(layers["dense"](x), layers["factored"](x), rtol=1e-12)
    for dense, factored in zip(grads["dense"], grads["factored"]):
        assert torch.allclose(dense, factored, rtol=1e-10, atol=1e-12)


def test_auto_picks_the_forward_with_fewer_flops_for_the_tokens_of_a_micro_batch():
    assert forward_flops(256, 256, 32, 1000, "factored") == 1000 * (4 * 256 * 512 + 2 * 32 * 512)
    assert forward_flops(256, 256, 32, 1000, "dense") == 1000 * 6 * 256**2 + 4 * 256**3 + 2 * 256**2 * 32
    assert pick_forward(256, 256, 32, 64, "auto") == "factored" and pick_forward(256, 256, 32, 4096, "auto") == "dense"
    assert pick_forward(256, 256, 32, 4096, "factored") == "factored"


def test_a_resample_is_a_bitwise_no_op_on_the_function_and_zeroes_the_active_moments():
    _, sst = layer(m=16, n=16, rank=4)
    optimizer = torch.optim.AdamW([sst.sigma, sst.U_active, sst.V_active], lr=1e-2)
    sst(torch.randn(8, 16)).pow(2).sum().backward()
    optimizer.step()  # the active copies moved away from their columns, as training does
    x = torch.randn(3, 16)
    before, old, params = sst(x), sst.active.clone(), [sst.sigma, sst.U_active, sst.V_active]
    sigma_moment = optimizer.state[sst.sigma]["exp_avg"].clone()
    resample([sst], ReplicatedAccess(optimizer), torch.Generator().manual_seed(7), "sigma")
    assert torch.equal(sst(x), before) and not torch.equal(sst.active, old)
    assert torch.equal(sst.U_active, sst.U[:, sst.active]) and torch.equal(sst.V_active, sst.V[:, sst.active])
    for active in (sst.U_active, sst.V_active):
        assert not optimizer.state[active]["exp_avg"].any() and not optimizer.state[active]["exp_avg_sq"].any()
    assert torch.equal(optimizer.state[sst.sigma]["exp_avg"], sigma_moment)  # sigma's components keep their meaning
    assert [p for p in optimizer.param_groups[0]["params"]] == params  # the same Parameter objects


def test_a_step_moves_every_sigma_and_only_the_active_columns_which_stay_unit():
    _, sst = layer(m=16, n=16, rank=4)
    u, v, sigma = sst.U.clone(), sst.V.clone(), sst.sigma.detach().clone()
    optimizer = torch.optim.AdamW([sst.sigma, sst.U_active, sst.V_active], lr=0.5)
    sst(torch.randn(8, 16)).pow(2).sum().backward()
    optimizer.step()
    project([sst], ReplicatedAccess(optimizer))
    assert torch.equal(sst.U, u) and torch.equal(sst.V, v)  # every column outside S: bitwise unchanged
    assert (sst.sigma != sigma).all() and (sst.sigma >= 0).all() and (sst.sigma == 0).any()  # lr 0.5 clamps some
    for active in (sst.U_active, sst.V_active):
        assert torch.allclose(active.norm(dim=0), torch.ones(4), atol=1e-6)


def test_a_re_svd_keeps_the_function_and_makes_the_bases_orthonormal_again():
    _, sst = layer(m=16, n=10, rank=4)
    with torch.no_grad():
        sst.U_active.add_(0.2 * torch.randn_like(sst.U_active))
    project([sst], ReplicatedAccess())
    x = torch.randn(3, 10)
    assert (sst.U.index_copy(1, sst.active, sst.U_active).T @ sst.U.index_copy(1, sst.active, sst.U_active)
            - torch.eye(10)).abs().max() > 1e-2  # drifted from orthonormal
    optimizer = torch.optim.AdamW([sst.sigma, sst.U_active, sst.V_active])
    sst(x).sum().backward()
    optimizer.step()
    before = sst(x)
    redecompose([sst], ReplicatedAccess(optimizer))
    assert torch.allclose(sst(x), before, rtol=1e-5, atol=1e-5)
    assert all(not optimizer.state[p]["exp_avg"].any() for p in (sst.sigma, sst.U_active, sst.V_active))
    assert torch.allclose(sst.U.T @ sst.U, torch.eye(10), atol=1e-5) and torch.allclose(sst.V.T @ sst.V, torch.eye(10), atol=1e-5)
    assert (sst.sigma >= 0).all() and torch.equal(sst.sigma, sst.sigma.sort(descending=True).values)


@pytest.mark.parametrize("rule", ["sigma", "mixed", "uniform"])
def test_sampling_is_distinct_the_same_from_the_same_state_and_follows_its_rule(rule):
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.5])
    draws = [sample_components(sigma, 3, torch.Generator().manual_seed(s), rule) for s in range(3)]
    assert all(d.unique().numel() == 3 for d in draws)
    assert torch.equal(sample_components(sigma, 3, torch.Generator().manual_seed(1), rule), draws[1])  # every rank's
    generator, n = torch.Generator().manual_seed(0), 6000
    counts = torch.bincount(torch.cat([sample_components(sigma, 1, generator, rule) for _ in range(n)]), minlength=6).double()
    stated = {"sigma": sigma / sigma.sum(), "mixed": (1 / 6 + sigma / sigma.sum()) / 2, "uniform": torch.full((6,), 1 / 6)}
    expected = n * stated[rule].double()
    assert torch.allclose(sampling_weights(sigma, rule) / sampling_weights(sigma, rule).sum(), stated[rule].double())
    chi2 = ((counts - expected) ** 2 / expected).sum()
    p_value = 1 - torch.special.gammainc(torch.tensor(5 / 2, dtype=torch.float64), chi2 / 2)  # chi-square, 5 dof
    assert p_value > 1e-3, (counts, expected)
    assert (counts[0] > 1.5 * counts[3]) == (rule != "uniform")  # a rule that ignored sigma would be refused at this n


def test_column_sums_of_squares_of_any_flat_range_add_up_to_the_whole():
    matrix = torch.randn(7, 5)
    flat = matrix.reshape(-1)
    for cuts in ([0, 35], [0, 3, 35], [0, 4, 5, 13, 20, 35], [0, 12, 14, 35]):
        total = sum(column_sums_of_squares(lo, flat[lo:hi], 5) for lo, hi in zip(cuts, cuts[1:]))
        assert torch.allclose(total, matrix.square().sum(0), rtol=1e-6)


def test_a_rank_that_leaves_no_frozen_component_is_refused():
    with pytest.raises(ValueError, match=r"sst rank 9 must be in 1..8 .*\(--rank\)"):
        layer(m=12, n=9, rank=9)
