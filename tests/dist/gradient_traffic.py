"""torchrun --nproc_per_node 2 tests/dist/gradient_traffic.py

The gradient bytes DDP all-reduces in one update (counted by a comm hook) equal the accounting identity
2 or 4 bytes x N_trainable x all-reduces: once per update with no_sync, once per micro-batch in the paper's
loop; for full-rank and ReLoRA. Prints "TRAFFIC OK" on rank 0.
"""

import torch

import relora_dist as rd
from relora_dist.backends.ddp import DDPBackend
from relora_dist.distributed import close_distributed, init_distributed
from relora_dist.methods import method_class
from relora_dist.models import build_model, llama_config_from_shape
from relora_dist.perf import ModelCounts, gradient_bytes_per_update

MICRO_BATCHES, SEQ = 3, 16


def main():
    info = init_distributed()
    config = llama_config_from_shape(32, 88, 2, 4, vocab_size=97, max_positions=64)
    counts = ModelCounts.from_config(config, rank=4, seq_len=SEQ, traits=method_class("full").cost_traits)
    for method in ("full", "relora"):
        for every_microbatch in (False, True):
            torch.manual_seed(0)
            model = build_model(config)
            if method == "relora":
                rd.wrap(model, rd.ReLoRAConfig(rank=4, alpha=8, dropout=0.0))
            backend = DDPBackend(device=info.device, count_gradient_bytes=True, allreduce_every_microbatch=every_microbatch)
            backend.setup(model, lambda groups: torch.optim.AdamW(groups), [{"params": [p for p in model.parameters() if p.requires_grad]}])
            for i in range(MICRO_BATCHES):
                tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(10 * info.rank + i))
                with (backend.no_sync() if i < MICRO_BATCHES - 1 else torch.enable_grad()):
                    backend.backward(backend.model(input_ids=tokens, labels=tokens).loss)
            all_reduces = MICRO_BATCHES if every_microbatch else 1
            expected = gradient_bytes_per_update(counts, method_class(method).cost_traits, grad_bytes=4,
                                                 all_reduces=all_reduces)
            measured = backend.gradient_traffic.bytes
            assert measured == expected, f"{method} every_microbatch={every_microbatch}: {measured} B != {expected} B"
    if info.rank == 0:
        print("TRAFFIC OK", flush=True)
    close_distributed()


if __name__ == "__main__":
    main()
