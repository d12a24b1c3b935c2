"""Optimizer-state pruning, the exact quantile, the jagged cosine and the controller (I4, I5)."""

import pytest
import torch
from torch import nn

import relora_dist as rd
from relora_dist.methods.relora.quantile import abs_quantiles


def adam_with_state(shapes=((6, 40), (30, 6)), seed=0):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    extra = nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW(params + [extra], lr=1e-2)
    for _ in range(3):
        (sum((p**2).sum() * (i + 1) for i, p in enumerate(params)) + (extra**3).sum()).backward()
        opt.step()
        opt.zero_grad()
    return opt, params, extra


def snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4099])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.8, 0.9, 0.999])
def test_quantile_equals_torch_quantile(n, q):
    torch.manual_seed(n)
    x = torch.randn(n)
    x[::5] = x[0]  # ties
    pieces = [x[: n // 3], x[n // 3 : n // 2], x[n // 2 :]]  # split like shards
    assert abs_quantiles([pieces], [n], q, lambda t: None)[0] == torch.quantile(x.abs(), q).item()


def test_quantile_above_torch_limit():
    """torch.quantile refuses > 2^24 elements; the radix select handles it exactly."""
    n = (1 << 24) + 3
    x = torch.arange(n, dtype=torch.float32).flip(0) * 0.5
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    got = abs_quantiles([[x]], [n], 0.5, lambda t: None)[0]
    # sorted values are 0, .5, 1, ...; rank (n-1)/2 = 8388609 exactly -> value 4194304.5
    assert got == 4194304.5


def test_reset_zeroes_exactly_and_only_lora_states():
    opt, params, extra = adam_with_state()
    before = snapshot(opt)
    rd.prune_adam_states(opt, params, rule="reset", ratio=0.0, restart_index=1)
    for p in params:
        assert opt.state[p]["exp_avg"].abs().sum() == 0 and opt.state[p]["exp_avg_sq"].abs().sum() == 0
        assert torch.equal(opt.state[p]["step"], before[id(p)]["step"])  # step kept
    for k, v in opt.state[extra].items():
        assert torch.equal(v, before[id(extra)][k])  # I4: non-LoRA untouched


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_prune_fraction_joint_mask_and_no_new_keys(method):
    opt, params, extra = adam_with_state()
    before = snapshot(opt)
    n_keys = len(opt.state)
    rd.prune_adam_states(opt, params, rule=method, ratio=0.7, restart_index=1)
    assert len(opt.state) == n_keys
    for p in params:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        zeroed = (v == 0).float().mean().item()
        assert 0.55 < zeroed < 0.85, zeroed
        assert torch.all(m[v == 0] == 0)  # m zeroed wherever v is
        kept = v != 0
        assert torch.equal(v[kept], before[id(p)]["exp_avg_sq"][kept])
        assert torch.equal(m[kept], before[id(p)]["exp_avg"][kept])
    for k, v in opt.state[extra].items():
        assert torch.equal(v, before[id(extra)][k])


def test_magnitude_threshold_is_the_quantile_of_v():
    opt, params, _ = adam_with_state()
    v0 = opt.state[params[0]]["exp_avg_sq"].clone()
    thr = torch.quantile(v0.flatten(), 0.8)
    rd.prune_adam_states(opt, params, rule="magnitude", ratio=0.8, restart_index=1)
    assert torch.equal(opt.state[params[0]]["exp_avg_sq"] != 0, v0 > thr)


def test_reference_semantics_independent_masks():
    opt, params, _ = adam_with_state()
    torch.manual_seed(5)  # decorrelate m and v so per-key thresholds disagree somewhere
    opt.state[params[0]]["exp_avg"].copy_(torch.randn(6, 40))
    opt.state[params[0]]["exp_avg_sq"].copy_(torch.rand(6, 40))
    m0 = opt.state[params[0]]["exp_avg"].clone()
    rd.prune_adam_states(opt, params, rule="magnitude", ratio=0.5, restart_index=1, reference=True)
    m = opt.state[params[0]]["exp_avg"]
    assert torch.equal(m != 0, m0.abs() > torch.quantile(m0.abs().flatten(), 0.5))
    v = opt.state[params[0]]["exp_avg_sq"]
    assert ((m != 0) & (v == 0)).any()  # the reference's hazard B4 is reproduced on request


def test_random_masks_keyed_by_restart_and_name():
    opt_a, pa, _ = adam_with_state()
    opt_b, pb, _ = adam_with_state()
    torch.manual_seed(99)  # the global RNG must not matter
    rd.prune_adam_states(opt_a, [("x.lora_A", pa[0])], rule="random", ratio=0.5, restart_index=3)
    rd.prune_adam_states(opt_b, [("x.lora_A", pb[0])], rule="random", ratio=0.5, restart_index=3)
    assert torch.equal(opt_a.state[pa[0]]["exp_avg"], opt_b.state[pb[0]]["exp_avg"])
    opt_c, pc, _ = adam_with_state()
    rd.prune_adam_states(opt_c, [("x.lora_A", pc[0])], rule="random", ratio=0.5, restart_index=4)
    assert not torch.equal(opt_a.state[pa[0]]["exp_avg"], opt_c.state[pc[0]]["exp_avg"])


def test_jagged_cosine_worked_values():
    kw = dict(total_steps=15000, first_warmup=500, restart_warmup=100, cycle_length=5000, min_lr_ratio=0.1)
    expected = {0: 0.0, 1: 0.002, 499: 0.998, 500: 1.0, 4999: 0.8026, 5000: 0.0, 5001: 0.00794, 5050: 0.397,
                5100: 0.7944, 9999: 0.3393, 10000: 0.0, 10001: 0.0033, 10100: 0.3307, 14999: 0.1}
    for t, value in expected.items():
        assert rd.jagged_cosine(t, **kw) == pytest.approx(value, abs=6e-4), t


def _run_controller(skips=()):
    cfg = rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=3, warm_start_steps=5)
    ctl = rd.ReLoRAController("relora", 40, cfg, warmup_steps=2)
    events, attempt = [], 0
    while ctl.step < 40:
        attempt += 1
        if attempt in skips:
            continue  # a skipped NaN update never reaches the controller
        lr = ctl.lr_factor()
        actions = ctl.after_update()
        events.append((ctl.step, lr, actions.wrap, actions.merge, actions.reset))
    return events


def test_controller_aligns_merges_with_zero_lr_even_after_skips():
    """I5: the update adjacent to each merge runs at LR 0, with or without skipped steps."""
    for skips in ((), (3, 4, 17, 18, 19, 33)):
        events = _run_controller(skips)
        assert [e[0] for e in events if e[2]] == [5]  # wrap after the warm start
        merges = [e for e in events if e[3]]
        assert [e[0] for e in merges] == [16, 26, 36] and all(e[4] for e in merges)
        assert all(e[1] == 0.0 for e in merges)
        assert events == _run_controller(())  # skipping changes nothing the controller decides


def test_controller_methods_phases():
    cfg = rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=3, warm_start_steps=5)
    assert rd.ReLoRAController("full", 20, cfg, 2).phase2_start == 20
    assert rd.ReLoRAController("lora", 20, cfg, 2).phase2_start == 0
    lora_ws = rd.ReLoRAController("lora_ws", 40, cfg, 2)
    events = [lora_ws.after_update() for _ in range(40)]
    assert not any(a.merge or a.reset for a in events) and events[4].wrap
    with pytest.raises(ValueError, match="unknown method"):
        rd.ReLoRAController("nope", 20, cfg, 2)
    with pytest.raises(ValueError, match="warm start"):
        rd.ReLoRAController("relora", 5, cfg, 2)


@pytest.mark.parametrize("restarts, optimizer_reset, jagged", [(True, False, False), (True, True, False),
                                                                (True, False, True), (False, True, True)])
def test_ablation_switches_turn_off_one_mechanism_each(restarts, optimizer_reset, jagged):
    """The paper's Table 1 rows: merges, optimizer resets and LR restarts each follow only their own switch, and
    without the jagged schedule the phase-2 LR is the plain warm-up + cosine."""
    cfg = rd.ReLoRAConfig(rank=4, merge_every=10, restart_warmup_steps=3, restarts=restarts,
                          optimizer_reset=optimizer_reset, jagged_schedule=jagged)
    ctl = rd.ReLoRAController("relora", 40, cfg, warmup_steps=2)
    lrs, actions = zip(*[(ctl.lr_factor(), ctl.after_update()) for _ in range(40)])
    assert [i + 1 for i, a in enumerate(actions) if a.merge] == ([11, 21, 31] if restarts else [])
    assert [i + 1 for i, a in enumerate(actions) if a.reset] == ([11, 21, 31] if optimizer_reset else [])
    plain = [rd.jagged_cosine(t, total_steps=40, first_warmup=2) for t in range(40)]
    assert (list(lrs) == plain) == (not jagged)
    assert (lrs[10] == 0.0) == jagged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be > 0"),
        (dict(prune_ratio=1.0), r"prune ratio must be in \[0, 1\)"),
        (dict(prune_ratio=-0.1), r"prune ratio must be in \[0, 1\)"),
        (dict(merge_every=5, restart_warmup_steps=10), "must be >= the restart warm-up"),
        (dict(prune="zero"), "prune must be one of"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rd.ReLoRAConfig(**kwargs)
