"""Collectives and bytes of one ReLoRA reset (merge + re-init + prune) per DeepSpeed ZeRO stage, counted on
real engines, next to what gathering W to merge it would move.

DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/reset_comm.py --presets 60m,350m --rank 128 \
    --out benchmarks/results/reset_comm.json

Every rank builds the preset, wraps it (rank r on all q/k/v/o/gate/up/down projections), takes one update
(so Adam states exist) and then runs a counted reset. Bytes are per rank: what an all-reduce sends, what
an all-gather receives. "W gather" is the bytes an all-gather of every frozen W would receive (what
GatheredParameters-based merging costs at ZeRO-3); replicated stages need none.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

import relora_dist as rd
from relora_dist.backends.deepspeed import DeepSpeedBackend
from relora_dist.comm import CollectiveCounter
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.models import build_model, llama_config
from relora_dist.prune import prune_states


def measure(preset: str, stage: int, dtype: str, prune: str, rank: int, info) -> dict:
    cfg = rd.ReLoRAConfig(rank=rank, alpha=2 * rank, merge_every=10, restart_warmup_steps=1, prune=prune, prune_ratio=0.9)
    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config(preset, vocab_size=32000, max_positions=256)), cfg)
    backend = DeepSpeedBackend(device=info.device, dtype=dtype, config={"zero_optimization": {"stage": stage}},
                               micro_batch_size=1, accumulation_steps=1, max_norm=1.0)
    backend.setup(model, lambda groups: torch.optim.AdamW(groups, lr=1e-4),
                  [{"params": [p for p in model.parameters() if p.requires_grad]}])
    tokens = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(info.rank))
    backend.backward(backend.model(input_ids=tokens, labels=tokens).loss)
    backend.step(lr=1e-4, max_norm=1.0)

    layers = rd.relora_layers(backend.unwrapped_model)
    named = rd.lora_parameters(backend.unwrapped_model)
    access = backend.shard_access()
    start = time.perf_counter()
    with CollectiveCounter() as counter:
        rd.merge_and_reinit_layers(layers, access, restart_index=1)
        prune_states(named, access, method=prune, ratio=0.9, seed=0, restart_index=1)
    seconds = time.perf_counter() - start
    numel = lambda p: p.ds_numel if hasattr(p, "ds_id") else p.numel()  # noqa: E731
    w_bytes = sum(numel(layer.weight) for layer in layers) * (2 if dtype == "bf16" else 4)
    lora_fp32_bytes = 4 * sum(numel(p) for _, p in named)
    wrapper, layer_count = type(backend.engine.optimizer).__name__, len(layers)
    backend.engine.destroy()
    del backend, model, layers, named, access
    gc.collect()  # engines hold several copies of the model: free them before the next case
    return {
        "preset": preset, "stage": stage, "dtype": dtype, "prune": prune, "rank": rank, "world_size": info.world_size,
        "wrapper": wrapper, "relora_layers": layer_count, "collectives": len(counter.calls), "bytes": counter.total_bytes,
        "by_op": counter.by_op(), "lora_fp32_bytes": lora_fp32_bytes,
        "w_gather_bytes": w_bytes * (info.world_size - 1) // info.world_size if stage == 3 else 0,
        "w_bytes": w_bytes, "reset_s": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="60m,350m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--prune", default="magnitude")
    parser.add_argument("--out", default="benchmarks/results/reset_comm.json")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    info = init_distributed()
    rows = []
    for preset in args.presets.split(","):
        for stage in map(int, args.stages.split(",")):
            for dtype in args.dtypes.split(","):
                row = measure(preset, stage, dtype, args.prune, args.rank, info)
                rows.append(row)
                if info.rank == 0:
                    print(f"{preset:>5} ZeRO-{stage} {dtype}: {row['collectives']:2d} collectives, {row['bytes'] / 2**20:8.2f} MiB"
                          f"  (A/B fp32 {row['lora_fp32_bytes'] / 2**20:7.2f} MiB; W gather would be "
                          f"{row['w_gather_bytes'] / 2**20:8.2f} MiB; W itself {row['w_bytes'] / 2**20:8.1f} MiB)"
                          f"  {row['wrapper']}, {row['reset_s']:.2f} s", flush=True)
    if info.rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        out.write_text(json.dumps({"machine": machine, "per_rank_bytes": True, "rows": rows}, indent=1))
        print(f"wrote {out}")
    close_distributed()


if __name__ == "__main__":
    main()
