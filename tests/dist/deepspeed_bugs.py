"""Canaries for the two DeepSpeed 0.19.8 bugs relora_dist works around, on the shapes the reset checks use.

DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/deepspeed_bugs.py

1. ZeRO-3 `safe_set_full_fp32_param` fails on the last rank when numel % world != 0 (the reset writes
   local slices instead).
2. ZeRO-2 with `round_robin_gradients`: `safe_get_full_fp32_param` (through `p._hp_mapping`) returns
   other parameters' data (the reset derives fragments from storage offsets instead).
Prints "BUG1 PRESENT"/"BUG2 PRESENT" on rank 0 where DeepSpeed still misbehaves, and "OURS OK" where our
layout code reads the true values. If a DeepSpeed release fixes a bug, its line disappears and the test
says the workaround may go.
"""

import argparse

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

import relora_dist as rd
from relora_dist.backends.deepspeed.backend import DeepSpeedBackend
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.models import build_model, llama_config_from_shape


def engine(info, zero):
    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config_from_shape(32, 87, 2, 2, vocab_size=97, max_positions=64)),
                    rd.ReLoRAConfig(rank=3, alpha=6, merge_every=2, restart_warmup_steps=1))
    backend = DeepSpeedBackend(device=info.device, dtype="fp32", config={"zero_optimization": zero}, micro_batch_size=2,
                               accumulation_steps=1, max_norm=1.0)
    backend.setup(model, lambda groups: torch.optim.AdamW(groups, lr=1e-2), [{"params": [p for p in model.parameters() if p.requires_grad]}])
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(info.rank))
    backend.backward(backend.model(input_ids=tokens, labels=tokens).loss)
    backend.step(lr=1e-2, max_norm=1.0)
    return backend


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.parse_args()
    info = init_distributed()

    backend = engine(info, {"stage": 3})
    A = backend.unwrapped_model.model.layers[0].mlp.down_proj.lora_A  # 3 x 87 = 261 elements
    assert A.ds_numel % info.world_size != 0
    try:
        safe_set_full_fp32_param(A, torch.zeros(A.ds_shape))
        failed = 0.0
    except RuntimeError:
        failed = 1.0
    flag = torch.tensor([failed])
    backend.all_reduce_sum(flag)
    if info.rank == 0 and flag.item() > 0:
        print("BUG1 PRESENT: ZeRO-3 safe_set_full_fp32_param fails for numel % world != 0", flush=True)
    backend.engine.destroy()

    backend = engine(info, {"stage": 2, "round_robin_gradients": True})
    params = [p for _, p in backend.unwrapped_model.named_parameters() if p.requires_grad]
    # fp32 training: the full low-precision params equal the masters, so they are the truth
    wrong_api = sum(not torch.equal(safe_get_full_fp32_param(p).view(p.shape), p.data) for p in params)
    ours = backend.shard_access().full_fp32(params)
    wrong_ours = sum(not torch.equal(value, p.data) for value, p in zip(ours, params))
    # and the packed masters path used in bf16 (fragments written at their global offsets, one all-reduce)
    access = backend.shard_access()
    access.lp_is_master = False
    wrong_packed = sum(not torch.equal(value, p.data) for value, p in zip(access.full_fp32(params), params))
    if info.rank == 0:
        if wrong_api:
            print(f"BUG2 PRESENT: round_robin_gradients: safe_get_full_fp32_param wrong for {wrong_api}/{len(params)} params", flush=True)
        if wrong_ours == 0 and wrong_packed == 0:
            print("OURS OK: storage-offset fragments read the true masters", flush=True)
    backend.engine.destroy()
    close_distributed()


if __name__ == "__main__":
    main()
