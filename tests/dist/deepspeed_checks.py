"""ReLoRA resets inside real DeepSpeed engines, several configurations per launch (a launch costs ~10 s).

DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/deepspeed_checks.py --cases z2-fp32-magnitude,z3-bf16-magnitude

Per case: the engine trains a tiny LLaMA (odd shapes, so partitions cut A, B and W mid-tensor) and, on every
rank, a plain torch copy trains on the whole global batch. At each of three restarts:
- exact: the engine's state right after merge + re-init + prune (W, low-precision A/B, fp32 masters, Adam
  states; gathered through DeepSpeed's own APIs) equals, bit for bit, the expectation computed from the
  gathered pre-reset state;
- communication: the reset moves no W-sized tensor (bytes <= 1.1 x fp32 A/B + the quantile histograms);
- replicas: tensors every rank holds whole are bit-identical (I3);
- fp32: parameters and Adam states equal the torch reference (~1e-6 relative), also after further steps.
Prints "CASE OK <name> ..." per case on rank 0.
"""

import argparse
import copy

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import relora_dist as rd
from relora_dist.backends.deepspeed.backend import DeepSpeedBackend
from relora_dist.comm import CollectiveCounter
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.access import ReplicatedAccess
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.methods.relora.prune import ADAM_KEYS, prune_states
from relora_dist.train.consistency import replica_mismatches
from reset_reference import (GLOBAL_BATCH, MERGE_AT, STEPS, VOCAB, expected_after_reset, global_batch, make_optimizer, relative,
                             train_both)


def parse_case(name: str) -> dict:
    """z{stage}-{fp32|bf16}-{prune}[-rr][-persist0][-offload][-bf16opt][-gathered]"""
    parts = name.split("-")
    case = {"name": name, "stage": int(parts[0][1]), "dtype": parts[1], "prune": parts[2]}
    zero = {"stage": case["stage"]}
    extra = {}
    for flag in parts[3:]:
        if flag == "rr":
            zero["round_robin_gradients"] = True
        elif flag == "persist0":
            zero["stage3_param_persistence_threshold"] = 0
        elif flag == "offload":
            zero["offload_optimizer"] = {"device": "cpu"}
        elif flag == "gathered":  # an eval forward right before the reset leaves ZeRO-3 params gathered
            case["gathered"] = True
        elif flag == "bf16opt":  # stage 1 + fp32 gradient accumulation: DeepSpeed picks BF16_Optimizer
            extra["data_types"] = {"grad_accum_dtype": "fp32"}
        else:
            raise SystemExit(f"unknown case flag {flag}")
    case["config"] = {"zero_optimization": zero, **extra}
    return case


# -- truth through DeepSpeed's own APIs ------------------------------------------------------------------
def full_value(p):
    if hasattr(p, "ds_id") and p.data.numel() != p.ds_numel:  # persistent params are already whole
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    return p.data.detach().clone()


def full_master(engine, p):
    value = safe_get_full_fp32_param(p)
    if value is not None:
        return value.detach().clone()
    wrapper = engine.optimizer
    for lp_group, hp_group in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp.detach().view(p.shape).clone()
    return p.data.detach().float().clone()  # plain optimizer: the param is the master


def full_state(engine, p, key):
    value = safe_get_full_optimizer_state(p, key)
    if value is not None:
        return value.detach().clone()
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    master = p
    for lp_group, hp_group in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                master = hp
    return inner.state[master][key].detach().view(p.shape if not hasattr(p, "ds_shape") else p.ds_shape).clone()


def snapshot(engine, layers, named_trainable):
    """W of every ReLoRA layer; low-precision value, fp32 master and Adam states of every trainable param
    (A/B and the rest: a reset must leave embeddings, norms and head untouched, I4)."""
    snap = {}
    for layer in layers:
        snap[f"{layer.relora_name}.weight"] = full_value(layer.weight)
    for name, p in named_trainable:
        snap[f"{name}/lp"] = full_value(p)
        snap[f"{name}/master"] = full_master(engine, p)
        for key in ADAM_KEYS:
            snap[f"{name}/{key}"] = full_state(engine, p, key)
    return snap


def run_case(case, info):
    rank, world = info.rank, info.world_size
    cfg = rd.ReLoRAConfig(rank=3, alpha=6, dropout=0.0, merge_every=2, restart_warmup_steps=1, prune=case["prune"], prune_ratio=0.7)
    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config_from_shape(32, 87, 2, 2, vocab_size=VOCAB, max_positions=64)), cfg)
    reference = copy.deepcopy(model)
    ref_opt = make_optimizer([{"params": [p for p in reference.parameters() if p.requires_grad]}])
    backend = DeepSpeedBackend(device=info.device, dtype=case["dtype"], config=case["config"], micro_batch_size=GLOBAL_BATCH // world,
                               accumulation_steps=1, max_norm=1.0)
    backend.setup(model, make_optimizer, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    engine = backend.engine
    layers = rd.relora_layers(backend.unwrapped_model)
    named_lora = rd.lora_parameters(backend.unwrapped_model)
    named_trainable = [(n, p) for n, p in backend.unwrapped_model.named_parameters() if p.requires_grad]
    ref_named = dict(reference.named_parameters())
    lora_fp32_bytes = 4 * sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for _, p in named_lora)
    # Magnitude prune: 4 rounds of an int32 [2 queries x tensors, 256] histogram (the exact quantile).
    histogram_bytes = 4 * 2 * len(named_lora) * 256 * 4 if case["prune"] == "magnitude" else 0
    report = {"exact": 0, "bytes": []}
    fp32 = case["dtype"] == "fp32"
    exact_check = "rr" not in case["name"].split("-")  # DeepSpeed's own full-state API is wrong with round robin

    def compare_with_reference(where):
        # With round robin DeepSpeed's full-state API reads the wrong slices: compare the params themselves
        # (whole on every rank below ZeRO-3, equal to the masters in fp32), which then reveal any wrong write.
        worst = 0.0
        for name, p in backend.unwrapped_model.named_parameters():
            value = full_master(engine, p) if p.requires_grad and exact_check else full_value(p)
            worst = max(worst, relative(ref_named[name].detach(), value))
            if p.requires_grad and exact_check:
                for key in ADAM_KEYS:
                    worst = max(worst, relative(ref_opt.state[ref_named[name]][key], full_state(engine, p, key)))
        assert worst < 1e-5, f"{case['name']} {where}: engine vs torch reference differ by {worst:.2e}"
        return worst

    worst = 0.0
    for step in range(1, STEPS + 1):
        train_both(backend, reference, ref_opt, step, rank, world)
        if step not in MERGE_AT:
            continue
        index = MERGE_AT.index(step) + 1
        if step == MERGE_AT[0]:  # I2: B learned from the first updates (A was Kaiming, not zero)
            assert all(full_master(engine, layer.lora_B).abs().sum() > 0 for layer in layers)
        if case.get("gathered"):
            backend.model.eval()
            with torch.no_grad():
                backend.model(input_ids=global_batch(-2)[:1])
            backend.model.train()
        pre = snapshot(engine, layers, named_trainable) if exact_check else None
        state_keys = len(getattr(engine.optimizer, "optimizer", engine.optimizer).state)
        with CollectiveCounter() as counter:
            rd.merge_and_reinit_layers(layers, backend.shard_access(), restart_index=index)
            stats = prune_states(named_lora, backend.shard_access(), rule=cfg.prune, ratio=cfg.prune_ratio, seed=cfg.seed,
                                 restart_index=index)
        # I4: no state keys added; about the configured fraction zeroed (measured on this rank's pieces)
        assert len(getattr(engine.optimizer, "optimizer", engine.optimizer).state) == state_keys
        assert abs(stats["zeroed"] - cfg.prune_ratio) < 0.15, stats
        rd.merge_and_reinit(reference, restart_index=index)
        prune_states(rd.lora_parameters(reference), ReplicatedAccess(ref_opt), rule=cfg.prune, ratio=cfg.prune_ratio,
                     seed=cfg.seed, restart_index=index)
        report["bytes"].append(counter.total_bytes)
        bound = 1.1 * lora_fp32_bytes + histogram_bytes + 8 * len(layers)  # + the ZeRO-3 finiteness flags
        assert counter.total_bytes <= bound, f"{case['name']}: reset moved {counter.total_bytes} B > {bound:.0f} B ({counter.by_op()})"
        if case["stage"] == 0:
            assert not counter.calls, f"{case['name']}: ZeRO-0 reset communicated {counter.by_op()}"
        if exact_check:
            post = snapshot(engine, layers, named_trainable)
            expected = expected_after_reset(pre, layers, named_lora, cfg, index, master="master", copies=("lp",))
            bad = [k for k in expected if not torch.equal(expected[k].to(post[k].device), post[k])]
            assert not bad, f"{case['name']} restart {index}: not the exact expectation: {bad[:6]}"
            report["exact"] += 1
            if fp32:  # I1: the merged engine computes what the pre-reset model computed (after the reset, so the
                # probe forward cannot leave ZeRO-3 params gathered during it)
                before = copy.deepcopy(reference)
                before.load_state_dict({k[: -len("/lp")] if k.endswith("/lp") else k: v for k, v in pre.items()
                                        if k.endswith("/lp") or k.endswith(".weight")}, strict=False)
                probe = global_batch(-1)[:1]
                backend.model.eval()
                with torch.no_grad():
                    after_logits = backend.model(input_ids=probe).logits.float()
                    before_logits = before(input_ids=probe).logits.float()
                backend.model.train()
                assert (after_logits - before_logits).abs().max() <= 1e-5 * before_logits.abs().max(), case["name"]
        mismatches = replica_mismatches(backend.replicated_named_tensors(), info.device)
        assert not mismatches, f"{case['name']}: replicas differ: {mismatches[:4]}"
        if fp32:
            worst = max(worst, compare_with_reference(f"restart {index}"))
    if fp32:
        worst = max(worst, compare_with_reference("end"))
    engine.destroy()
    if rank == 0:
        detail = f"vs_reference={worst:.1e}" if fp32 else "bf16"
        print(f"CASE OK {case['name']} wrapper={type(engine.optimizer).__name__} exact_restarts={report['exact']} "
              f"reset_bytes={report['bytes']} {detail}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    info = init_distributed()
    for name in args.cases.split(","):
        run_case(parse_case(name), info)
    torch.distributed.barrier()
    close_distributed()


if __name__ == "__main__":
    main()
