"""Invariants I1-I4 on a real engine, against a single-process reference on the same global batches.

torchrun --nproc_per_node 2 tests/dist/invariants.py --backend ddp --cases magnitude:fp32,random:fp32,magnitude:bf16

Each rank also trains a plain single-process copy on the *whole* global batch; after every merge and
reset the engine's model must match it (fp32: ~1e-6 relative), replicas must be bit-identical, and the
reset must touch only the A/B states. Prints "INVARIANTS OK ..." on rank 0 after each case (prune rule : dtype).
"""

import argparse
import copy

import torch

import relora_dist as rd
from relora_dist.backends import build_backend
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.access import ReplicatedAccess
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.methods.relora.prune import prune_states
from relora_dist.train.consistency import replica_mismatches
from reset_reference import LR, MERGE_AT, STEPS, VOCAB, global_batch, make_optimizer


def relative_difference(a, b):
    return max(((x.double() - y.double()).abs().max() / x.double().abs().max().clamp(min=1e-12)).item()
               for x, y in zip(a.values(), b.values()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="ddp")
    parser.add_argument("--cases", default="magnitude:fp32", help="comma list of prune:dtype")
    args = parser.parse_args()
    info = init_distributed()
    for case in args.cases.split(","):
        prune, dtype = case.split(":")
        check_invariants(info, args.backend, prune, dtype)
    close_distributed()


def check_invariants(info, backend_name: str, prune: str, dtype: str) -> None:
    rank, world = info.rank, info.world_size
    cfg = rd.ReLoRAConfig(rank=4, alpha=8, dropout=0.0, merge_every=2, restart_warmup_steps=1, prune=prune, prune_ratio=0.7)

    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config_from_shape(32, 88, 2, 2, vocab_size=VOCAB, max_positions=64)), cfg)
    reference = copy.deepcopy(model)
    ref_opt = make_optimizer([{"params": [p for p in reference.parameters() if p.requires_grad]}])
    backend = build_backend(backend_name, device=info.device, dtype=dtype)
    backend.setup(model, make_optimizer, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    probe = global_batch(-1)
    checks = 0

    for step in range(1, STEPS + 1):
        batch = global_batch(step)
        local = batch.chunk(world)[rank]
        with backend.forward_context():
            loss = backend.model(input_ids=local, labels=local).loss
        backend.backward(loss)
        with backend.forward_context():
            reference(input_ids=batch, labels=batch).loss.backward()
        if step == 1:  # I2: B learns from the first step (the reference code zeroed A and B)
            assert all(layer.lora_B.grad.abs().sum() > 0 for layer in rd.relora_layers(backend.unwrapped_model))
        backend.step(lr=LR, max_norm=1.0)
        torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
        backend.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        if step not in MERGE_AT:
            continue
        index = MERGE_AT.index(step) + 1

        # I1: the merge preserves the function. Checked in fp32 compute: the parameters are fp32 masters
        # in both modes, and bf16 autocast would add rounding of its own on either side.
        backend.model.eval()
        with torch.no_grad():
            before = backend.model(input_ids=probe).logits.float()
            rd.merge_and_reinit_layers(rd.relora_layers(backend.unwrapped_model), backend.shard_access(), restart_index=index)
            after = backend.model(input_ids=probe).logits.float()
        backend.model.train()
        assert (after - before).abs().max() <= 1e-5 * before.abs().max(), (after - before).abs().max()
        rd.merge_and_reinit(reference, restart_index=index)

        # I4: the reset touches only A/B states, adds no keys, zeroes about the ratio, m where v is.
        state = backend.optimizer.state
        lora_ids = {id(p) for _, p in rd.lora_parameters(backend.unwrapped_model)}
        others = {id(p): {k: v.clone() for k, v in s.items()} for p, s in state.items() if id(p) not in lora_ids}
        keys_before = len(state)
        stats = prune_states(rd.lora_parameters(backend.unwrapped_model), backend.shard_access(), rule=cfg.prune,
                             ratio=cfg.prune_ratio, seed=cfg.seed, restart_index=index)
        prune_states(rd.lora_parameters(reference), ReplicatedAccess(ref_opt), rule=cfg.prune, ratio=cfg.prune_ratio,
                     seed=cfg.seed, restart_index=index)
        assert len(state) == keys_before
        assert all(torch.equal(v, others[id(p)][k]) for p, s in state.items() if id(p) in others for k, v in s.items())
        expected = 1.0 if cfg.prune == "reset" else cfg.prune_ratio
        assert abs(stats["zeroed"] - expected) < 0.1, stats
        for _, p in rd.lora_parameters(backend.unwrapped_model):
            assert torch.all(state[p]["exp_avg"][state[p]["exp_avg_sq"] == 0] == 0)

        # I3: replicated tensors bit-identical on every rank; and equal to the single-process reference.
        mismatches = replica_mismatches(backend.replicated_named_tensors(), info.device)
        assert not mismatches, mismatches
        if dtype == "fp32":
            diff = relative_difference(reference.state_dict(), backend.unwrapped_model.state_dict())
            assert diff < 1e-5, f"step {step}: engine vs reference differ by {diff:.2e}"
        checks += 1

    if rank == 0:
        print(f"INVARIANTS OK backend={backend_name} dtype={dtype} prune={prune} world={world} restarts={checks}", flush=True)


if __name__ == "__main__":
    main()
