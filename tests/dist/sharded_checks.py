"""ReLoRA resets inside real FSDP2, fairscale OSS + ShardedDDP and ZeroRedundancyOptimizer engines.

torchrun --nproc_per_node 2 tests/dist/sharded_checks.py --cases fsdp2-fp32-magnitude,fairscale-fp32-random

Per case: the engine trains a tiny LLaMA (odd shapes: FSDP2 rows split unevenly, A split across ranks) and,
on every rank, a plain torch copy trains on the whole global batch. At each of three restarts:
- exact: W, A, B and every Adam state right after merge + re-init + prune (gathered with DTensor's
  full_tensor, or from the owner rank) equal, bit for bit, the expectation computed from the gathered
  pre-reset state with the single-process code path;
- communication: FSDP2 moves A (and the few B rows beside a shard boundary) in one all_to_all plus tiny
  all-reduces, never an all-gather; OSS and ZeroRedundancyOptimizer move nothing;
- I1 (the merged model computes what it did before), I2, I3 (replicated tensors bit-identical), I4;
- fp32: parameters and Adam states equal the torch reference (~1e-6 relative), also after further steps.
Prints "CASE OK <name> ..." per case on rank 0.
"""

import argparse
import copy

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import relora_dist as rd
from relora_dist.backends import build_backend
from relora_dist.comm import CollectiveCounter
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.access import ReplicatedAccess
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.methods.relora.prune import ADAM_KEYS, prune_states
from relora_dist.train.consistency import replica_mismatches
from reset_reference import MERGE_AT, STEPS, VOCAB, expected_after_reset, global_batch, make_optimizer, relative, train_both


def parse_case(name: str) -> dict:
    """{fsdp2|fairscale|zero_redundancy}-{fp32|bf16}-{prune}[-r1][-noreshard][-gathered]"""
    backend, dtype, prune, *flags = name.split("-")
    case = {"name": name, "backend": backend, "dtype": dtype, "prune": prune, "rank": 3, "reshard": True, "gathered": False}
    for flag in flags:
        if flag == "r1":  # r < world: one rank holds no rows of A
            case["rank"] = 1
        elif flag == "noreshard":  # FSDP2 keeps gathered params after forward
            case["reshard"] = False
        elif flag == "gathered":  # an eval forward right before the reset leaves params unsharded
            case["gathered"] = True
        else:
            raise SystemExit(f"unknown case flag {flag}")
    return case


# -- truth, independent of relora_dist's access classes ---------------------------------------------------
def full(t):
    return t.full_tensor().detach().clone() if isinstance(t, DTensor) else t.detach().clone()


def state_holder(backend):
    optimizer = backend.optimizer
    return getattr(optimizer, "optim", optimizer)  # OSS / ZeroRedundancyOptimizer: the owner's optimizer


def full_state(backend, p, key):
    value = state_holder(backend).state.get(p, {}).get(key)
    if isinstance(value, DTensor):
        return full(value)
    # Owner-sharded: the owner contributes its state, every other rank zeros (exactly one owner).
    out = value.detach().clone() if value is not None else torch.zeros(p.shape)
    owners = torch.tensor([float(value is not None)])
    dist.all_reduce(out)
    dist.all_reduce(owners)
    assert owners.item() == 1, f"{owners.item()} ranks hold a state of one parameter"
    return out


def snapshot(backend, layers, named_trainable):
    snap = {f"{layer.relora_name}.weight": full(layer.weight) for layer in layers}
    for name, p in named_trainable:
        snap[f"{name}/param"] = full(p)
        for key in ADAM_KEYS:
            snap[f"{name}/{key}"] = full_state(backend, p, key)
    return snap


def probe_logits(backend):
    backend.model.eval()
    with torch.no_grad(), backend.forward_context():
        logits = backend.model(input_ids=global_batch(-1)[:2]).logits.float()
    backend.model.train()
    return logits


def run_case(case, info):
    rank, world = info.rank, info.world_size
    cfg = rd.ReLoRAConfig(rank=case["rank"], alpha=2 * case["rank"], dropout=0.0, merge_every=2, restart_warmup_steps=1,
                          prune=case["prune"], prune_ratio=0.7)
    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config_from_shape(32, 87, 2, 2, vocab_size=VOCAB, max_positions=64)), cfg)
    reference = copy.deepcopy(model)
    ref_opt = make_optimizer([{"params": [p for p in reference.parameters() if p.requires_grad]}])
    options = {"reshard_after_forward": case["reshard"]} if case["backend"] == "fsdp2" else {}
    backend = build_backend(case["backend"], device=info.device, dtype=case["dtype"], **options)
    backend.setup(model, make_optimizer, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    layers = rd.relora_layers(backend.unwrapped_model)
    named_lora = rd.lora_parameters(backend.unwrapped_model)
    named_trainable = [(n, p) for n, p in backend.unwrapped_model.named_parameters() if p.requires_grad]
    ref_named = dict(reference.named_parameters())
    lora_fp32_bytes = 4 * sum(p.numel() for _, p in named_lora)
    histogram_bytes = 4 * 2 * len(named_lora) * 256 * 4 if case["prune"] == "magnitude" else 0
    fp32 = case["dtype"] == "fp32"
    fsdp2 = case["backend"] == "fsdp2"
    report = {"exact": 0, "bytes": [], "calls": []}

    def compare_with_reference(where):
        worst = 0.0
        for name, p in backend.unwrapped_model.named_parameters():
            worst = max(worst, relative(ref_named[name].detach(), full(p)))
            if p.requires_grad:
                for key in ADAM_KEYS:
                    worst = max(worst, relative(ref_opt.state[ref_named[name]][key], full_state(backend, p, key)))
        assert worst < 1e-5, f"{case['name']} {where}: engine vs torch reference differ by {worst:.2e}"
        return worst

    worst = 0.0
    for step in range(1, STEPS + 1):
        train_both(backend, reference, ref_opt, step, rank, world)
        if step not in MERGE_AT:
            continue
        index = MERGE_AT.index(step) + 1
        if step == MERGE_AT[0]:  # I2: B learned from the first updates (A was Kaiming, not zero)
            assert all(full(layer.lora_B).abs().sum() > 0 for layer in layers)
        pre = snapshot(backend, layers, named_trainable)
        # An eval forward right before the reset leaves FSDP2 params gathered (reshard_after_forward=False, and
        # always at the root): the reset must still write the shards.
        before_logits = probe_logits(backend) if fp32 or case["gathered"] else None
        state_keys = len(state_holder(backend).state)
        with CollectiveCounter() as counter:
            rd.merge_and_reinit_layers(layers, backend.shard_access(), restart_index=index)
            stats = prune_states(named_lora, backend.shard_access(), rule=cfg.prune, ratio=cfg.prune_ratio, seed=cfg.seed,
                                 restart_index=index)
        # I4: no state keys added; about the configured fraction zeroed (on this rank's pieces)
        assert len(state_holder(backend).state) == state_keys
        expected_zeroed = 1.0 if cfg.prune == "reset" else cfg.prune_ratio
        assert abs(stats["zeroed"] - expected_zeroed) < 0.15, stats
        rd.merge_and_reinit(reference, restart_index=index)
        prune_states(rd.lora_parameters(reference), ReplicatedAccess(ref_opt), rule=cfg.prune, ratio=cfg.prune_ratio,
                     seed=cfg.seed, restart_index=index)

        ops = counter.by_op()
        report["bytes"].append(counter.total_bytes)
        report["calls"].append(len(counter.calls))
        if fsdp2:  # one all_to_all (A, B rows beside shard boundaries) + finiteness flags + 4 histograms
            assert set(ops) <= {"all_to_all_single", "all_reduce"}, f"{case['name']}: W-sized gathers? {ops}"
            assert ops["all_to_all_single"]["calls"] == 1, ops
            assert ops["all_reduce"]["calls"] == 1 + 4 * (cfg.prune == "magnitude"), ops
            bound = 1.1 * lora_fp32_bytes + histogram_bytes + 4 * len(layers)
            assert counter.total_bytes <= bound, f"{case['name']}: reset moved {counter.total_bytes} B > {bound:.0f} B ({ops})"
        else:
            assert not counter.calls, f"{case['name']}: an owner-sharded reset communicated {ops}"

        post = snapshot(backend, layers, named_trainable)
        expected = expected_after_reset(pre, layers, named_lora, cfg, index, master="param")
        bad = [k for k in expected if not torch.equal(expected[k], post[k])]
        assert not bad, f"{case['name']} restart {index}: not the exact expectation: {bad[:6]}"
        report["exact"] += 1
        if before_logits is not None and fp32:  # I1
            after_logits = probe_logits(backend)
            assert (after_logits - before_logits).abs().max() <= 1e-5 * before_logits.abs().max(), case["name"]
            if fsdp2:
                backend.reshard()  # the truth helpers read sharded params and their states
        mismatches = replica_mismatches(backend.replicated_named_tensors(), info.device)
        assert not mismatches, f"{case['name']}: replicas differ: {mismatches[:4]}"
        if fp32:
            worst = max(worst, compare_with_reference(f"restart {index}"))
    if fp32:
        worst = max(worst, compare_with_reference("end"))
    if rank == 0:
        detail = f"vs_reference={worst:.1e}" if fp32 else "bf16"
        print(f"CASE OK {case['name']} exact_restarts={report['exact']} reset_calls={report['calls']} "
              f"reset_bytes={report['bytes']} {detail}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    args = parser.parse_args()
    info = init_distributed()
    for name in args.cases.split(","):
        run_case(parse_case(name), info)
    close_distributed()


if __name__ == "__main__":
    main()
