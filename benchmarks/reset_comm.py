"""Collectives and bytes of one ReLoRA reset (merge + re-init + prune) per engine (DeepSpeed ZeRO 0-3, FSDP2,
fairscale OSS, ZeroRedundancyOptimizer), counted on real engines, next to what gathering W to merge it would move.

DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/reset_comm.py --presets 60m,350m --rank 128 \
    --out benchmarks/results/reset_comm.json

Every rank builds the preset, wraps it (rank r on all q/k/v/o/gate/up/down projections), takes one update
(so Adam states exist) and then runs a counted reset. Bytes are per rank: what an all-reduce sends, what
an all-gather receives. "W gather" is the bytes an all-gather of every frozen W would receive (what
merging through gathered parameters costs where W is sharded: ZeRO-3, FSDP2); replicated engines need none.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import relora_dist as rd
from relora_dist.backends.labels import ENGINE_LABELS
from relora_dist.benchmarks.common import build_engine, write_results
from relora_dist.comm import CollectiveCounter
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.models import build_model, causal_lm_loss, llama_config
from relora_dist.methods.relora.prune import prune_states


ENGINES = tuple(name for name in ENGINE_LABELS if name != "ddp")  # the sharded engines


def measure(preset: str, engine: str, dtype: str, prune: str, rank: int, info) -> dict:
    cfg = rd.ReLoRAConfig(rank=rank, alpha=2 * rank, merge_every=10, restart_warmup_steps=1, prune=prune, prune_ratio=0.9)
    torch.manual_seed(0)
    model = rd.wrap(build_model(llama_config(preset, vocab_size=32000, max_positions=256)), cfg)
    backend = build_engine(engine, dtype, info.device)
    backend.setup(model, lambda groups: torch.optim.AdamW(groups, lr=1e-4),
                  [{"params": [p for p in model.parameters() if p.requires_grad]}])
    tokens = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(info.rank))
    with backend.forward_context():
        loss = causal_lm_loss(backend.model, tokens)
    backend.backward(loss)
    backend.step(lr=1e-4, max_norm=1.0)
    backend.zero_grad()

    layers = rd.relora_layers(backend.unwrapped_model)
    named = rd.lora_parameters(backend.unwrapped_model)
    access = backend.shard_access()
    start = time.perf_counter()
    with CollectiveCounter() as counter:
        rd.merge_and_reinit_layers(layers, access, restart_index=1)
        prune_states(named, access, rule=prune, ratio=0.9, seed=0, restart_index=1)
    seconds = time.perf_counter() - start
    numel = lambda p: p.ds_numel if hasattr(p, "ds_id") else p.numel()  # noqa: E731
    w_bytes = sum(numel(layer.weight) * layer.weight.element_size() for layer in layers)
    lora_fp32_bytes = 4 * sum(numel(p) for _, p in named)
    w_sharded = engine in ("zero3", "fsdp2")
    wrapper, layer_count = type(backend.optimizer).__name__, len(layers)
    backend.close()
    del backend, model, layers, named, access
    gc.collect()  # engines hold several copies of the model: free them before the next case
    return {
        "preset": preset, "engine": engine, "dtype": dtype, "prune": prune, "rank": rank, "world_size": info.world_size,
        "wrapper": wrapper, "relora_layers": layer_count, "collectives": len(counter.calls), "bytes": counter.total_bytes,
        "by_op": counter.by_op(), "lora_fp32_bytes": lora_fp32_bytes,
        "w_gather_bytes": w_bytes * (info.world_size - 1) // info.world_size if w_sharded else 0,
        "w_bytes": w_bytes, "reset_s": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="60m,350m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--prune", default="magnitude")
    parser.add_argument("--out", default="benchmarks/results/reset_comm.json")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    info = init_distributed()
    rows = []
    for preset in args.presets.split(","):
        for engine in args.engines.split(","):
            for dtype in args.dtypes.split(","):
                row = measure(preset, engine, dtype, args.prune, args.rank, info)
                rows.append(row)
                if info.rank == 0:
                    print(f"{preset:>5} {engine:>15} {dtype}: {row['collectives']:2d} collectives, {row['bytes'] / 2**20:8.2f} MiB"
                          f"  (A/B fp32 {row['lora_fp32_bytes'] / 2**20:7.2f} MiB; W gather would be "
                          f"{row['w_gather_bytes'] / 2**20:8.2f} MiB; W itself {row['w_bytes'] / 2**20:8.1f} MiB)"
                          f"  {row['wrapper']}, {row['reset_s']:.2f} s", flush=True)
    if info.rank == 0:
        write_results(rows, args.out, extra={"per_rank_bytes": True})
    close_distributed()


if __name__ == "__main__":
    main()
