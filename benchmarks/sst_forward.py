"""SST's two forwards of one layer, timed against each other on this machine (#35: pick one per case, state the rule).

    python benchmarks/sst_forward.py                  # LLaMA shapes of the CPU presets and the paper's 130M, 1 thread
    python benchmarks/sst_forward.py --threads 2 --rounds 30

- `factored`: (x V) diag(sigma) U^T, the bases assembled from the frozen columns and the active copies; backward
  through both bases again: 4 k (m + n) FLOPs per token, plus 2 r (m + n) for the active columns' gradients;
- `dense`: W = U diag(sigma) V^T rebuilt in every forward (2 m n k), y = x W^T; backward G = dH^T X, dH W, G V for
  sigma's and U_S's gradients, G^T U_S for V_S's: 6 m n per token plus 4 m n k + 2 m n r per micro-batch.

Each round runs one forward + backward of each mode in turn on the same input (drift hits them alike); the median
over rounds is reported with the FLOPs each mode executes and the mode `--sst-forward auto` picks (the fewer FLOPs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from relora_dist.benchmarks.common import write_results
from relora_dist.methods.sst.layer import FORWARDS, SSTLinear, forward_flops

# (name, in, out): LLaMA's square and MLP projections at the CPU presets' and the paper's 130M widths
SHAPES = [("9m q", 256, 256), ("9m up", 256, 688), ("9m down", 688, 256), ("20m q", 384, 384), ("20m up", 384, 1024),
          ("130m q", 768, 768), ("130m up", 768, 2048), ("130m down", 2048, 768)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="256,1024,4096", help="tokens per micro-batch (micro-batch x sequence)")
    parser.add_argument("--rank", type=int, default=64, help="r, the active components")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/sst_forward.json")
    return parser.parse_args(argv)


def time_once(layer: SSTLinear, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, n, m in SHAPES:
        torch.manual_seed(0)
        layers = {mode: SSTLinear(nn.Linear(n, m, bias=False), rank=args.rank, generator=torch.Generator().manual_seed(0),
                                  forward=mode) for mode in FORWARDS if mode != "auto"}
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, n)
            times = {mode: [] for mode in layers}
            for _ in range(args.rounds + 2):
                for mode, layer in layers.items():
                    times[mode].append(time_once(layer, x))
            median = {mode: statistics.median(t[2:]) * 1e3 for mode, t in times.items()}  # the first two warm up
            flops = {mode: forward_flops(m, n, args.rank, tokens, mode) for mode in layers}
            row = {"shape": name, "in": n, "out": m, "rank": args.rank, "tokens": tokens,
                   **{f"{mode}_ms": round(median[mode], 3) for mode in layers},
                   **{f"{mode}_gflops": round(flops[mode] / 1e9, 4) for mode in layers},
                   "dense_over_factored": round(median["dense"] / median["factored"], 3),
                   "faster": min(median, key=median.get), "auto_picks": min(flops, key=flops.get)}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    agree = sum(r["faster"] == r["auto_picks"] for r in rows)
    print(f"auto picks the faster forward in {agree} of {len(rows)} cases")
    write_results(rows, args.out, extra={"threads": args.threads, "rounds": args.rounds, "auto_agrees": agree})


if __name__ == "__main__":
    main()
