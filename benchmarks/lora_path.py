"""ReLoRA's unfused low-rank path, variant against variant and against full rank, in one process, interleaved.

    python benchmarks/lora_path.py                         # 20m, seq 256, micro-batch 4, r 32, LoRA dropout 0.1, 1 thread
    python benchmarks/lora_path.py --rounds 40 --lora-dropout 0

Multi-rank timings on a small shared CPU move by 10-25% between runs, more than the path's own changes; here every
round runs one forward + backward of each variant in turn on the same batch, so drift hits them alike, and the
median over rounds is reported. Variants (the same weights; ReLoRA's B drawn non-zero so no gradient is trivially 0):

- `full`: the full-rank model (every weight trainable);
- `before`: ReLoRA with the low-rank term added out of place, `frozen + s * ((dropout(x) A^T) B^T)` (commit 17953e8);
- `per_module`: ReLoRA as it runs by default now: the scale on the small factors and the term added in place;
- `shared`: `per_module` with `--shared-lora-input` (one dropout mask and one GEMM per q/k/v and gate/up group);
- `shared_bits16`: `shared` with `--lora-dropout-mask bits16` (the mask cut from 16 random bits an element).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from relora_dist import ReLoRAConfig, ReLoRALinear, relora_layers, wrap
from relora_dist.benchmarks.common import keep_host_memory, write_results
from relora_dist.models import build_model, causal_lm_loss, llama_config


def out_of_place_forward(self: ReLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The path as it was before the in-place add (commit 17953e8)."""
    frozen = F.linear(x, self.weight, self.bias)
    return frozen + self.scale * F.linear(F.linear(self._dropped(x), self.lora_A), self.lora_B)


@contextlib.contextmanager
def forward_as(forward):
    """ReLoRALinear.forward replaced for the duration (None: unchanged)."""
    original = ReLoRALinear.forward
    ReLoRALinear.forward = forward or original
    try:
        yield
    finally:
        ReLoRALinear.forward = original


def build_variants(args) -> dict[str, tuple[torch.nn.Module, object]]:
    torch.manual_seed(0)
    full = build_model(llama_config(args.preset, vocab_size=args.vocab_size, max_positions=args.seq_len))
    variants = {"full": (full, None)}
    for name, shared, mask, forward in (("before", False, "aten", out_of_place_forward), ("per_module", False, "aten", None),
                                        ("shared", True, "aten", None), ("shared_bits16", True, "bits16", None)):
        model = wrap(copy.deepcopy(full), ReLoRAConfig(rank=args.rank, alpha=32.0, dropout=args.lora_dropout, dropout_mask=mask,
                                                       shared_lora_input=shared, fused_kernels="off"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in relora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
        variants[name] = (model, forward)
    return variants


def time_round(model, forward, tokens) -> tuple[float, float]:
    with forward_as(forward):
        start = time.perf_counter()
        loss = causal_lm_loss(model, tokens)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return middle - start, end - middle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="20m")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/lora_path_ab.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_host_memory(torch.device("cpu"))
    variants = build_variants(args)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len), generator=torch.Generator().manual_seed(2))
    samples = {name: [] for name in variants}
    for i in range(args.warmup_rounds + args.rounds):
        for name, (model, forward) in variants.items():
            times = time_round(model, forward, tokens)
            if i >= args.warmup_rounds:
                samples[name].append(times)
    full_s = statistics.median(f + b for f, b in samples["full"])
    rows = []
    for name, times in samples.items():
        total = statistics.median(f + b for f, b in times)
        rows.append({"variant": name, "forward_ms": 1e3 * statistics.median(f for f, _ in times),
                     "backward_ms": 1e3 * statistics.median(b for _, b in times), "fwd_bwd_ms": 1e3 * total,
                     "speed_vs_full": full_s / total, "fwd_bwd_ms_all": [1e3 * (f + b) for f, b in times]})
        print(f"{name:>10}: forward {rows[-1]['forward_ms']:7.1f} ms  backward {rows[-1]['backward_ms']:7.1f} ms  "
              f"fwd+bwd {rows[-1]['fwd_bwd_ms']:7.1f} ms  full / this {rows[-1]['speed_vs_full']:.3f}x")
    write_results(rows, args.out, extra={"config": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
