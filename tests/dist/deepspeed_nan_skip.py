"""A non-finite loss on one rank skips the update on every rank, at every DeepSpeed layout.

DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/deepspeed_nan_skip.py

Three updates per layout, the middle one poisoned with NaN on rank 1 only: it must report stepped=False on
both ranks, leave every parameter unchanged and finite, and the next update must step normally.
Prints "SKIP OK stage=S dtype=D" per layout on rank 0.
"""

import argparse

import torch

import relora_dist as rd
from relora_dist.backends.deepspeed.backend import DeepSpeedBackend
from relora_dist.backends.deepspeed.layout import full_parameters
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.models import build_model, llama_config_from_shape

LAYOUTS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


def params_snapshot(backend):
    """Full values: fp32 masters of trainable params, the (gathered) frozen ones."""
    names = [n for n, _ in backend.unwrapped_model.named_parameters()]
    return list(full_parameters(backend.engine, backend.shard_access(), names).values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.parse_args()
    info = init_distributed()
    for stage, dtype in LAYOUTS:
        torch.manual_seed(0)
        model = rd.wrap(build_model(llama_config_from_shape(32, 87, 2, 2, vocab_size=97, max_positions=64)),
                        rd.ReLoRAConfig(rank=3, alpha=6, merge_every=2, restart_warmup_steps=1))
        backend = DeepSpeedBackend(device=info.device, dtype=dtype, config={"zero_optimization": {"stage": stage}},
                                   micro_batch_size=2, accumulation_steps=1, max_norm=1.0)
        backend.setup(model, lambda groups: torch.optim.AdamW(groups, lr=1e-2),
                      [{"params": [p for p in model.parameters() if p.requires_grad]}])
        tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(info.rank))
        stepped = []
        for poison in (False, True, False):
            before = params_snapshot(backend)
            loss = backend.model(input_ids=tokens, labels=tokens).loss
            if poison and info.rank == 1:
                loss = loss * float("nan")
            backend.backward(loss)
            flag = torch.tensor([float(not poison)])
            backend.all_reduce_sum(flag)
            _, did_step = backend.step(lr=1e-2, max_norm=1.0, loss_is_finite=bool(flag.item() == info.world_size))
            stepped.append(did_step)
            after = params_snapshot(backend)
            assert all(torch.isfinite(p).all() for p in after), f"stage {stage} {dtype}: non-finite parameters"
            if poison:
                assert all(torch.equal(a, b) for a, b in zip(before, after)), f"stage {stage} {dtype}: skipped update changed params"
        assert stepped == [True, False, True], f"stage {stage} {dtype}: stepped {stepped}"
        backend.engine.destroy()
        if info.rank == 0:
            print(f"SKIP OK stage={stage} dtype={dtype}", flush=True)
    close_distributed()


if __name__ == "__main__":
    main()
