"""The package root's public names (the README's library example) survive the move into method packages, and the
renamed keyword of prune_adam_states keeps its old spelling as a deprecated alias."""

import pytest
import torch

import relora_dist as rd


def test_root_exports_resolve_to_the_relora_package():
    for name in rd.__all__:
        obj = getattr(rd, name)
        module = getattr(obj, "__module__", None) or "relora_dist.models"
        assert module.startswith(("relora_dist.methods.relora", "relora_dist.methods.lr_schedule", "relora_dist.models")), (name, module)


def _optimizer_with_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    return opt, p


def test_prune_adam_states_accepts_the_old_keyword_with_a_warning():
    new_opt, new_p = _optimizer_with_state()
    old_opt, old_p = _optimizer_with_state()
    rd.prune_adam_states(new_opt, [("x.lora_A", new_p)], rule="random", ratio=0.5, restart_index=2)
    with pytest.warns(DeprecationWarning, match="rule="):
        rd.prune_adam_states(old_opt, [("x.lora_A", old_p)], method="random", ratio=0.5, restart_index=2)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new_opt.state[new_p][key], old_opt.state[old_p][key])
    with pytest.raises(TypeError, match="both"):
        rd.prune_adam_states(old_opt, [old_p], rule="reset", method="reset", ratio=0.5, restart_index=2)
    with pytest.raises(TypeError, match="rule"):
        rd.prune_adam_states(old_opt, [old_p], ratio=0.5, restart_index=2)
