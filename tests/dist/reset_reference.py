"""What the multi-rank check scripts share: the tiny run they train, and the exact post-reset expectation.

Each script trains an engine on 2 ranks and, on every rank, a plain torch copy on the whole global batch.
"""

import types

import torch

from relora_dist.access import ReplicatedAccess
from relora_dist.access import add_in_fp32
from relora_dist.methods.relora.merge import lora_delta
from relora_dist.methods.relora.prune import ADAM_KEYS, prune_states
from relora_dist.randomness import kaiming_uniform_A

VOCAB, SEQ, GLOBAL_BATCH, STEPS, MERGE_AT = 97, 16, 4, 7, (2, 4, 6)
LR = 3e-3


def make_optimizer(groups):
    return torch.optim.AdamW(groups, lr=LR, eps=1e-3)  # eps: see tests/conftest.py


def global_batch(step):
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def train_both(backend, reference, ref_opt, step: int, rank: int, world: int) -> None:
    """One update: the engine on this rank's share of the global batch, the fp32 reference on all of it."""
    batch = global_batch(step)
    local = batch.chunk(world)[rank]
    with backend.forward_context():
        loss = backend.model(input_ids=local, labels=local).loss
    backend.backward(loss)
    _, stepped = backend.step(lr=LR, max_norm=1.0)
    assert stepped, f"update {step} skipped"
    backend.zero_grad()
    reference(input_ids=batch, labels=batch).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
    ref_opt.step()
    ref_opt.zero_grad()


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp(min=1e-12)).item()


def expected_after_reset(pre, layers, named_lora, cfg, index, *, master="master", copies=()):
    """Merge, re-init and prune applied to gathered full tensors with the single-process code path.

    `pre` maps "<layer>.weight" and "<param>/<kind>" (kind: `master`, each of `copies`, "exp_avg", "exp_avg_sq")
    to full tensors; the merge reads the masters, re-init writes the masters and the low-precision copies.
    """
    exp = {k: v.clone() for k, v in pre.items()}
    for layer in layers:
        n = layer.relora_name
        add_in_fp32(exp[f"{n}.weight"].view(-1), lora_delta(pre[f"{n}.lora_B/{master}"], pre[f"{n}.lora_A/{master}"], layer.scale))
        A_new = kaiming_uniform_A(tuple(pre[f"{n}.lora_A/{master}"].shape), seed=layer.seed, restart_index=index, name=n)
        for kind in (master, *copies):
            exp[f"{n}.lora_A/{kind}"] = A_new.to(pre[f"{n}.lora_A/{kind}"].dtype)
            exp[f"{n}.lora_B/{kind}"].zero_()
    fake = [(name, torch.nn.Parameter(exp[f"{name}/{master}"].clone())) for name, _ in named_lora]
    holder = types.SimpleNamespace(state={p: {k: exp[f"{name}/{k}"] for k in ADAM_KEYS} for name, p in fake})
    prune_states(fake, ReplicatedAccess(holder), rule=cfg.prune, ratio=cfg.prune_ratio, seed=cfg.seed, restart_index=index)
    return exp
