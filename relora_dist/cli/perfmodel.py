"""relora-perfmodel: the analytic performance model from the command line.

  relora-perfmodel table4 [--json]      the paper's hardware table: predicted vs paper, fits, misses and why
  relora-perfmodel cpu [--json]         this machine's measured profile (GEMM, copy bandwidth, gloo all-reduce)
  relora-perfmodel predict --preset 1b --hardware a100_40gb --world-size 8 [--micro-batch B] [--no-sync] [--method M]
  relora-perfmodel projection --preset 7b --hardware h100_sxm --world-size 8 [--rank R]
                                        GaLore/Fira's per-update all-reduce where FSDP2 / ZeRO-3 split the rows

Bad input ends in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from ..methods import method_class, method_names
from ..train.config import standalone_method

PROG = "relora-perfmodel"
A_PRIORI_ETA_MM = 0.45  # GPUs without a paper point (note 2.6, S0)
WIDTHS = (8, 8, 8, 4, 6, 6, 6, 6, 8)  # table4 columns after setup and method


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def format_table4(table) -> str:
    lines = [
        "Paper hardware table (SPEC 4): LLaMA 1.3B, seq 512, pure bf16, DDP all-reducing every micro-batch, global ex/s.",
        "Scheme S5: eta_mm per GPU type fitted on that GPU's full-rank point only; eta_bw 0.75, phi 0, busbw a priori;",
        "every ReLoRA figure is out of sample. b = micro-batch derived from memory, acc = micro-steps per update.",
        "",
    ]
    header = ("setup", "method", "pred", "paper", "error", "b", "acc", "MFU", "HFU", "comm", "mem GB")
    lines.append(f"{header[0]:<14}{header[1]:<8}" + "".join(f"{h:>{w}}" for h, w in zip(header[2:], WIDTHS)) + "  note")
    for r in table.rows:
        note = "fitted" if r["fitted"] else ("within 10%" if r["meets_goal"] else "MISS (see below)")
        cells = (f"{r['predicted']:.1f}", f"{r['paper']:.1f}", _pct(r["error"]), r["micro_batch"],
                 f"{r['accumulation']:.1f}", f"{r['mfu']:.0%}", f"{r['hfu']:.0%}", f"{r['exposed_comm_fraction']:.0%}", f"{r['memory_gb']:.1f}")
        row = "".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS))
        lines.append(f"{r['setup']:<14}{r['method']:<8}{row}  {note}")
    lines += ["", "Speedups and warm start (1/3 of the tokens full-rank; the time-weighted mean is harmonic):",
              (f"{'setup':<14}{'speedup pred':>13}{'paper':>8}{'harmonic pred':>15}{'harmonic paper':>16}"
               f"{'paper column':>14}")]
    for r in table.rows[::2]:
        lines.append(f"{r['setup']:<14}{_pct(r['speedup_predicted']):>13}{_pct(r['speedup_paper']):>8}"
                     f"{r['warm_start_harmonic_predicted']:>15.1f}{r['warm_start_harmonic_paper']:>16.1f}"
                     f"{r['warm_start_paper']:>14.1f}")
    lines += ["", "Fitted parameters:"]
    for setup, f in table.fits.items():
        lines.append(f"  {setup:<14}eta_mm {f['eta_mm']:.3f} fitted on {f['fitted_on']}; eta_bw {f['eta_bw']:g}, "
                     f"phi {f['phi']:g} fixed; busbw a priori")
    m = table.memory
    at = ", ".join(f"{gb:.2f} GB at b={b}" for b, gb in m["peak_saved_gb_at_micro_batch"].items())
    lines += ["", (f"Memory: static {m['static_full_gb']:.2f} GB full vs {m['static_relora_gb']:.2f} GB ReLoRA per GPU "
                   f"({m['static_saved_gb']:.2f} GB saved); ReLoRA keeps {m['extra_activations_gb_per_example']:.2f} GB "
                   "more activations per example (LoRA dropout),"),
              (f"  so at equal micro-batch the peak saving is {at}: the paper's 'up to {m['claim_gb']:g} GB' "
               f"is the saving at b={m['micro_batch_saving_claim']:.1f}.")]
    misses = [r for r in table.rows if r["reason"]]
    lines += ["", f"Misses of the 10% goal: {len(misses)}"]
    lines += [f"  {r['setup']} {r['method']} {_pct(r['error'])}: {r['reason']}" for r in misses]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Analytic throughput/memory model of full-rank vs ReLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table4", help="the paper's hardware table, predicted vs paper")
    table.add_argument("--json", action="store_true", help="one JSON object per (setup, method)")
    cpu = sub.add_parser("cpu", help="measure this machine's profile")
    cpu.add_argument("--json", action="store_true")
    cpu.add_argument("--threads", type=int, default=1)
    cpu.add_argument("--world-size", type=int, default=2, help="gloo processes for the all-reduce probe")
    pred = sub.add_parser("predict", help="one prediction")
    pred.add_argument("--preset", default="1b", help="model preset (relora_dist.models.PRESETS)")
    pred.add_argument("--hardware", default="a100_40gb", help="a profile name, or 'cpu' to measure this machine")
    pred.add_argument("--world-size", type=int, default=8)
    pred.add_argument("--method", choices=method_names(), default="relora",
                      help="a registered training method (its cost traits and, for control, its smaller model)")
    pred.add_argument("--micro-batch", type=int, default=None, help="default: the largest that fits")
    pred.add_argument("--global-batch", type=int, default=1152)
    pred.add_argument("--seq-len", type=int, default=512)
    pred.add_argument("--rank", type=int, default=None,
                      help="rank of the low-rank methods (default: their config's: 128 for the ReLoRA family, the "
                           "official config's for CoLA)")
    pred.add_argument("--vocab-size", type=int, default=32100)
    pred.add_argument("--precision", default="pure_bf16", help="pure_bf16, bf16_master or fp32")
    pred.add_argument("--lora-dropout", type=float, default=0.1)
    pred.add_argument("--no-sync", action="store_true", help="one all-reduce per update instead of per micro-batch")
    pred.add_argument("--eta-mm", type=float, default=None, help="default: the S5 fit for this GPU, else 0.45")
    pred.add_argument("--eta-bw", type=float, default=None)
    pred.add_argument("--phi", type=float, default=None)
    pred.add_argument("--json", action="store_true")
    proj = sub.add_parser("projection", help="what GaLore/Fira's official projection adds on FSDP2 and ZeRO-3")
    proj.add_argument("--preset", default="1b", help="model preset (relora_dist.models.PRESETS)")
    proj.add_argument("--hardware", default="a100_40gb", help="a profile name (relora_dist.perf.hardware.PROFILES)")
    proj.add_argument("--world-size", type=int, default=8)
    proj.add_argument("--rank", type=int, default=None, help="GaLore's rank (default: the official one for the size)")
    proj.add_argument("--param-bytes", type=int, default=2, choices=(2, 4),
                      help="bytes per parameter the engine gathers and reduce-scatters (2: bf16 mixed precision)")
    proj.add_argument("--vocab-size", type=int, default=32100)
    proj.add_argument("--json", action="store_true")
    return parser


def _default_efficiency(hardware: str):
    """S5 fit where the GPU has a paper point; a priori otherwise; efficiencies of 1 for the measured CPU."""
    from ..perf.model import PAPER_SETUPS, Efficiency, fit_paper_setup

    if hardware == "cpu":
        return Efficiency(1.0, 1.0, 0.0), "measured CPU profile, efficiencies 1"
    gpu = hardware.split("_")[0]  # a100_80gb shares the A100's fitted GEMM efficiency
    for setup in PAPER_SETUPS:
        if setup.hardware.split("_")[0] == gpu:
            return fit_paper_setup(setup), f"eta_mm fitted on {setup.setup} full-rank ({setup.full:g} ex/s), S5"
    return Efficiency(A_PRIORI_ETA_MM), "a priori (no paper point for this GPU)"


def _predict(args) -> str:
    from ..models import llama_config
    from ..perf.hardware import PROFILES, measure_cpu_profile
    from ..perf.model import Workload, predict

    if args.hardware != "cpu" and args.hardware not in PROFILES:
        raise ValueError(f"unknown hardware {args.hardware!r}; choose cpu or one of {', '.join(PROFILES)} (--hardware)")
    for flag, value in (("--seq-len", args.seq_len), ("--rank", args.rank), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {args.lora_dropout} (--lora-dropout)")
    hardware = measure_cpu_profile(world_size=args.world_size) if args.hardware == "cpu" else PROFILES[args.hardware]
    section = method_class(args.method).config_class
    rank = args.rank if args.rank is not None else getattr(section, "rank", None)  # the dataclass default
    method = standalone_method(args.method, rank=rank)
    config = method.model_config(llama_config(args.preset, vocab_size=args.vocab_size, max_positions=max(1024, args.seq_len)))
    rank = method.resolved_rank(config) if args.rank is None else rank
    workload = Workload.from_config(
        config, rank=rank, seq_len=args.seq_len, traits=method.cost_traits, label=args.method,
        world_size=args.world_size, global_batch=args.global_batch, micro_batch=args.micro_batch, precision=args.precision,
        allreduce_every_microbatch=not args.no_sync, lora_dropout=args.lora_dropout)
    eff, source = _default_efficiency(args.hardware)
    given = {"eta_mm": args.eta_mm, "eta_bw": args.eta_bw, "phi": args.phi}
    overrides = {k: v for k, v in given.items() if v is not None}
    eff = replace(eff, **overrides)
    if overrides:
        source += f"; {', '.join(overrides)} from the command line"
    if eff.eta_mm <= 0 or eff.eta_bw <= 0 or not 0 <= eff.phi <= 1:
        raise ValueError("efficiencies must be > 0 and phi in [0, 1] (--eta-mm, --eta-bw, --phi)")
    p = predict(workload, hardware, eff)
    if args.json:
        return json.dumps({**p.as_dict(), "efficiency": asdict(eff), "efficiency_source": source}, indent=1)
    ms = {k: 1e3 * getattr(p, k) for k in ("t_fwd", "t_bwd", "t_book", "t_allreduce", "t_exposed", "t_optimizer")}
    return "\n".join([
        f"{args.preset} {args.method} on {args.world_size}x {hardware.name} ({hardware.description})",
        f"efficiency: eta_mm {eff.eta_mm:.3f}, eta_bw {eff.eta_bw:g}, phi {eff.phi:g} ({source})",
        (f"micro-batch {p.micro_batch}, {p.accumulation:.2f} micro-steps and {p.allreduces_per_update:.2f} "
         f"all-reduces per update; memory {p.memory_bytes / 1e9:.1f} of {p.memory_capacity / 1e9:.1f} GB"),
        (f"per micro-step: fwd {ms['t_fwd']:.1f} ms, bwd {ms['t_bwd']:.1f} ms, grad bookkeeping {ms['t_book']:.1f} ms, "
         f"all-reduce {ms['t_allreduce']:.1f} ms ({ms['t_exposed']:.1f} exposed)"),
        (f"per update: {p.t_update:.3f} s (optimizer {ms['t_optimizer']:.1f} ms, "
         f"exposed comm {p.exposed_comm_fraction:.0%})"),
        (f"throughput: {p.examples_per_s:.1f} ex/s global ({p.examples_per_s_per_gpu:.2f} per GPU), "
         f"{p.tokens_per_s:.0f} tokens/s; MFU {p.mfu:.1%}, HFU {p.hfu:.1%}"),
    ])


def _projection(args) -> str:
    from ..models import llama_config
    from ..perf.accounting import ModelCounts
    from ..perf.hardware import PROFILES
    from ..perf.model import split_rows_projection_cost

    if args.hardware not in PROFILES:
        raise ValueError(f"unknown hardware {args.hardware!r}; choose one of {', '.join(PROFILES)} (--hardware)")
    if args.world_size < 1 or (args.rank is not None and args.rank < 1):
        raise ValueError("--world-size and --rank must be >= 1")
    method = standalone_method("galore", rank=args.rank)
    config = llama_config(args.preset, vocab_size=args.vocab_size)
    rank = method.resolved_rank(config)
    counts = ModelCounts.from_config(config, rank=rank, seq_len=1, traits=method.cost_traits)
    cost = split_rows_projection_cost(counts, args.world_size, PROFILES[args.hardware], param_bytes=args.param_bytes)
    if args.json:
        return json.dumps({"preset": args.preset, "hardware": args.hardware, "world_size": args.world_size, "rank": rank,
                           "param_bytes": args.param_bytes, **cost}, indent=1)
    mib = 2**20
    return "\n".join([
        f"{args.preset} GaLore/Fira std, rank {rank}, on {args.world_size}x {args.hardware}: FSDP2 / ZeRO-3 per update",
        (f"  left-projected partial products all-reduced: {cost['reduce_payload_bytes'] / mib:.1f} MiB fp32, "
         f"{cost['reduce_sent_bytes'] / mib:.1f} MiB sent per rank, {1e3 * cost['reduce_s']:.2f} ms"),
        (f"  the engine's own gathers and reduce-scatter: {cost['engine_sent_bytes'] / mib:.0f} MiB sent per rank, "
         f"{1e3 * cost['engine_s']:.1f} ms (+{cost['reduce_sent_bytes'] / cost['engine_sent_bytes']:.2%} bytes)"),
        f"  moments kept whole on every rank: +{cost['whole_moments_extra_bytes'] / 2**30:.2f} GiB per rank",
        "  (--galore-proj right sends none of it and shards those moments; a different optimizer: docs/METHODS.md)",
    ])


def _cpu(args) -> str:
    from ..perf.hardware import measure_cpu_profile

    hw = measure_cpu_profile(threads=args.threads, world_size=args.world_size)
    if args.json:
        return json.dumps(asdict(hw), indent=1)
    return (f"{hw.description}\nbf16 GEMM {hw.peak_flops / 1e9:.1f} GFLOP/s, fp32 GEMM {hw.fp32_flops / 1e9:.1f} GFLOP/s, "
            f"copy bandwidth {hw.mem_bw / 1e9:.2f} GB/s (read + write), memory {hw.memory_bytes / 2**30:.1f} GiB\n"
            f"gloo all-reduce busbw {hw.busbw / 1e9:.3f} GB/s, latency {hw.latency_s * 1e6:.0f} us per ring step")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse prints its own one-line error and exits 2
    try:
        if args.command == "table4":
            from ..perf.model import paper_table4

            table = paper_table4()
            print(json.dumps(table.rows, indent=1) if args.json else format_table4(table))
        elif args.command == "cpu":
            print(_cpu(args))
        elif args.command == "projection":
            print(_projection(args))
        else:
            print(_predict(args))
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
