"""Fused ReLoRA linear vs its baselines at LLaMA shapes, next to the roofline floor of each.

    python benchmarks/fused_kernels.py [--out benchmarks/results/kernels.json] [--quick]

On CUDA: `triton.testing.do_bench` medians (L2 flushed between reps) of forward and forward+backward for the
fused kernels, cuBLAS dense x @ W^T (forward) and the frozen dx GEMM (backward), the addmm path
(Unsloth-style), the PEFT path with and without dropout, and `torch.compile` of the PEFT formula.
Everywhere: the roofline model (research/fused_kernels.md section 2) for the GPU of the run or, on a CPU, for
A100 and H100, as ratios to the dense GEMM. On a CPU no kernel is timed, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# Peak bf16 dense TFLOP/s and HBM TB/s (datasheet figures; real kernels reach ~75-85%).
PEAKS = {"A100-SXM": (312e12, 2.04e12), "H100-SXM": (989e12, 3.35e12)}
SHAPES = [(2048, 2048), (4096, 4096), (4096, 11008), (11008, 4096), (5461, 2048)]  # (in K, out N)
TOKENS = (4096, 16384)
RANKS = (64, 128, 256)
BYTES = 2  # bf16


@dataclass
class Step:
    flops: float
    bytes: float


def _time(steps: list[Step], peak: float, bandwidth: float) -> float:
    return sum(max(s.flops / peak, s.bytes / bandwidth) for s in steps)


def roofline(M: int, N: int, K: int, r: int, peak: float, bandwidth: float) -> dict[str, float]:
    """Seconds of each pipeline as the sum over its kernels of max(FLOPs / peak, compulsory bytes / bandwidth)."""
    b = BYTES
    dense = Step(2 * M * N * K, b * (M * K + N * K + M * N))
    down = Step(2 * M * K * r, b * (M * K + r * K + M * r))
    up = Step(2 * M * N * r, b * (M * r + N * r + M * N))
    elementwise = lambda reads, writes: Step(0, b * (reads + writes))  # noqa: E731
    fwd = {
        "dense": [dense],
        "ideal": [Step(dense.flops + 2 * M * r * (N + K), b * (M * K + N * K + M * N + r * (N + K)))],
        "fused": [down, Step(dense.flops + 2 * M * N * r, dense.bytes + b * (M * r + N * r))],
        "addmm": [dense, down, Step(up.flops, b * (M * r + N * r + 2 * M * N))],
        "peft": [dense, down, up, elementwise(M * N, M * N), elementwise(2 * M * N, M * N)],
    }
    fwd["peft_dropout"] = fwd["peft"] + [Step(0, b * 2 * M * K + M * K)]  # dropout: read x, write x' and a bool mask
    dx = Step(2 * M * N * K, b * (M * N + N * K + M * K))
    bwd = {
        "dense_dx": [dx],
        "ideal": [Step(dx.flops + 4 * M * r * (N + K), b * (M * N + N * K + 2 * M * K) + 4 * r * (N + K))],
        "fused": [Step(4 * M * N * r, b * (M * N + N * r + M * r) + 4 * (M * r + N * r)),
                  Step(dx.flops + 4 * M * K * r, b * (M * N + N * K + 2 * M * K + M * r) + 4 * r * K)],
        "peft": [dx, Step(2 * M * N * r, b * (M * N + N * r + M * r)), Step(2 * M * N * r, b * (M * N + M * r + N * r)),
                 Step(2 * M * K * r, b * (M * r + M * K + r * K)), Step(2 * M * K * r, b * (M * r + r * K + M * K)),
                 elementwise(2 * M * K, M * K), elementwise(M * N, M * N)],
    }
    out = {f"fwd_{k}": _time(v, peak, bandwidth) for k, v in fwd.items()}
    out.update({f"bwd_{k}": _time(v, peak, bandwidth) for k, v in bwd.items()})
    return out


def roofline_rows(devices: dict[str, tuple[float, float]], quick: bool) -> list[dict]:
    rows = []
    for device, (peak, bandwidth) in devices.items():
        for K, N in SHAPES[:2] if quick else SHAPES:
            for M in TOKENS[:1] if quick else TOKENS:
                for r in RANKS:
                    t = roofline(M, N, K, r, peak, bandwidth)
                    row = {"device": device, "M": M, "N": N, "K": K, "r": r, "dense_fwd_us": t["fwd_dense"] * 1e6}
                    row.update({f"model_{k}_vs_dense": v / (t["fwd_dense"] if k.startswith("fwd") else t["bwd_dense_dx"])
                                for k, v in t.items() if k not in ("fwd_dense", "bwd_dense_dx")})
                    rows.append(row)
    return rows


def gpu_rows(quick: bool) -> list[dict]:
    """Measured medians on this GPU (bf16), fused vs baselines, same inputs for all."""
    import triton

    from relora_dist.kernels import fused_relora_linear

    def peft(x, W, A, B, s, p):
        y = x @ W.T
        return y + (torch.nn.functional.dropout(x, p) @ A.T @ B.T) * s

    compiled = torch.compile(peft)
    rows = []
    for K, N in SHAPES[:2] if quick else SHAPES:
        for M in TOKENS[:1] if quick else TOKENS:
            for r in RANKS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
                A = (torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / K**0.5).requires_grad_()
                B = (torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.01).requires_grad_()
                dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
                both = lambda f: lambda: f().backward(dy)  # noqa: E731
                cases = {
                    "dense_fwd": lambda: x @ W.T,
                    "fused_fwd": lambda: fused_relora_linear(x, W, A, B, 2.0),
                    "fused_fwd_dropout": lambda: fused_relora_linear(x, W, A, B, 2.0, dropout_p=0.1),
                    "addmm_fwd": lambda: (x @ W.T).addmm_(x @ A.T, B.T, alpha=2.0),
                    "peft_fwd": lambda: peft(x, W, A, B, 2.0, 0.0),
                    "peft_fwd_dropout": lambda: peft(x, W, A, B, 2.0, 0.1),
                    "compiled_peft_fwd": lambda: compiled(x, W, A, B, 2.0, 0.0),
                    "dense_dx_bwd": lambda: dy @ W,
                    "fused_fwd_bwd": both(lambda: fused_relora_linear(x, W, A, B, 2.0)),
                    "fused_fwd_bwd_dropout": both(lambda: fused_relora_linear(x, W, A, B, 2.0, dropout_p=0.1)),
                    "peft_fwd_bwd": both(lambda: peft(x, W, A, B, 2.0, 0.0)),
                    "peft_fwd_bwd_dropout": both(lambda: peft(x, W, A, B, 2.0, 0.1)),
                }
                row = {"device": torch.cuda.get_device_name(), "M": M, "N": N, "K": K, "r": r}
                row.update({f"{name}_ms": bench(fn) for name, fn in cases.items()})
                row["fused_fwd_vs_dense"] = row["fused_fwd_ms"] / row["dense_fwd_ms"]
                row["fused_bwd_vs_dense_dx"] = (row["fused_fwd_bwd_ms"] - row["fused_fwd_ms"]) / row["dense_dx_bwd_ms"]
                row["peft_dropout_vs_fused_dropout"] = row["peft_fwd_bwd_dropout_ms"] / row["fused_fwd_bwd_dropout_ms"]
                rows.append(row)
                print(f"{row['device']} M={M} {K}->{N} r={r}: fused fwd {row['fused_fwd_vs_dense']:.3f}x dense, "
                      f"bwd {row['fused_bwd_vs_dense_dx']:.3f}x dx, PEFT+dropout / fused+dropout {row['peft_dropout_vs_fused_dropout']:.2f}x",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--quick", action="store_true", help="two shapes, one token count")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    devices = PEAKS
    if cuda:
        name = torch.cuda.get_device_name()
        devices = {k: v for k, v in PEAKS.items() if k.split("-")[0] in name} or PEAKS
    model = roofline_rows(devices, args.quick)
    print("roofline model (ratios to the dense GEMM: forward to x @ W^T, backward to the frozen dx GEMM; bf16)")
    print(f"{'device':>9} {'M':>6} {'K->N':>12} {'r':>4} {'dense us':>9} {'ideal':>6} {'fused':>6} {'addmm':>6} {'PEFT':>6}"
          f" {'PEFT p.1':>8} | {'bwd ideal':>9} {'fused':>6} {'PEFT':>6}")
    for row in model:
        print(f"{row['device']:>9} {row['M']:>6} {row['K']:>5}->{row['N']:<6} {row['r']:>4} {row['dense_fwd_us']:>9.1f}"
              f" {row['model_fwd_ideal_vs_dense']:>6.3f} {row['model_fwd_fused_vs_dense']:>6.3f} {row['model_fwd_addmm_vs_dense']:>6.3f}"
              f" {row['model_fwd_peft_vs_dense']:>6.3f} {row['model_fwd_peft_dropout_vs_dense']:>8.3f} |"
              f" {row['model_bwd_ideal_vs_dense']:>9.3f} {row['model_bwd_fused_vs_dense']:>6.3f} {row['model_bwd_peft_vs_dense']:>6.3f}")
    measured = gpu_rows(args.quick) if cuda else []
    if not cuda:
        print("no GPU here: no kernel was timed; the table above is the roofline model only")
    result = {"machine": {"platform": platform.platform(), "cuda": torch.cuda.get_device_name() if cuda else None,
                          "torch": torch.__version__},
              "measured": measured, "roofline_model": model,
              "note": "measured: do_bench medians in ms on the named GPU" if cuda else "no GPU: roofline model only, nothing timed"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
