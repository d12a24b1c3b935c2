"""Write BENCHMARKS.md from the result files in benchmarks/results/ (every table names the machine that measured it).

    python benchmarks/report.py            # after relora-bench, relora-memprof, slow_link.py, relora-perfmodel table4 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

MIB = 2**20


def _machine(data: dict) -> str:
    m = data["machine"]
    device = f"{m['gpu_count']}x {m['gpu']}" if m.get("gpu") else f"CPU only ({m['cpu_count']} cores, {m['processor']})"
    memory = f" Host allocator: {m['host_memory']}." if m.get("host_memory") else ""
    return f"Measured on {device}, torch {m.get('torch', '?')}, {m['platform']}.{memory}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _arg(data: dict, flag: str, default="?"):
    """A setting from the argv a harness recorded (older rows do not carry every setting)."""
    argv = data.get("argv", [])
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else default


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def throughput_section(data: dict) -> str:
    rows = data["rows"]
    r0 = rows[0]
    header = ["engine", "method", "ex/s (global)", "tokens/s/GPU", "MFU", "HFU", "fwd s", "bwd s", "exposed comm s",
              "optimizer s", "MiB sent/update", "merge+reset s"]
    body = [[r["engine"], r["method"], f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s_per_gpu']:.0f}",
             f"{100 * r['mfu']:.1f}%", f"{100 * r['hfu']:.1f}%", f"{r['forward_s']:.3f}", f"{r['backward_s']:.3f}",
             "n/a" if r["exposed_comm_s"] is None else f"{r['exposed_comm_s']:.3f}", f"{r['optimizer_s']:.3f}",
             f"{r['bytes_per_update'] / MIB:.1f}", f"{r['merge_reset_s']:.2f}"] for r in rows]
    speedups = ", ".join(f"{s['engine']} {_pct(s['speedup'] - 1)}" for s in data.get("speedups", []))
    return "\n\n".join([
        "## Throughput (`relora-bench`)",
        f"{_machine(data)} Preset {r0['preset']}, vocab {_arg(data, '--vocab-size', 32100)}, seq {r0['seq_len']}, {r0['dtype']}, "
        f"{r0['world_size']} ranks, micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']} accumulation; "
        f"every low-rank method (the LoRA family, CoLA, CR-Net) at r={r0['rank'] if r0['rank'] else next((r['rank'] for r in rows if r['rank']), '-')}. MFU/HFU against "
        f"{r0['peak_source']} ({r0['peak_flops_per_gpu'] / 1e9:.0f} GFLOP/s). {_timing(r0)} Every method in its last "
        "phase (the low-rank one for LoRA+WS and ReLoRA: a warm start runs at full rank's speed); Control is the "
        "smaller full-rank model. Exposed comm: fwd+bwd above a compute-only "
        "pass (n/a for DeepSpeed, which reduces inside its own backward/step). Bytes include every collective "
        "(FSDP2/ZeRO-3 parameter gathers too: they move the frozen W as well, so ReLoRA barely shrinks them).",
        _table(header, body),
        f"ReLoRA speedup per engine: {speedups}. At this size on a CPU, ReLoRA's extra LoRA GEMMs and unfused "
        "dropout cost more than the saved dW GEMMs and gradient bytes: see the slow-link sweep for where it wins.",
        "![throughput](benchmarks/results/throughput.png)",
    ])


def projected_section(bench: dict, refresh: dict | None, memory: dict | None) -> str:
    """GaLore / Fira per engine against full rank: speed, bytes of an ordinary and of a refreshing update, optimizer
    state (census against the exact accounting)."""
    rows = {(r["engine"], r["method"]): r for r in bench["rows"]}
    refreshing = {(r["engine"], r["method"]): r for r in (refresh or {}).get("rows", [])}
    census = {(r["engine"], r["method"]): r for r in (memory or {}).get("rows", [])}
    r0 = bench["rows"][0]
    header = ["engine", "method", "ex/s vs full", "MiB sent/update", "MiB sent/refresh update", "full rank MiB/update",
              "optimizer + projectors MiB (census / expected)"]
    body = []
    for (engine, method), r in rows.items():
        full = rows.get((engine, "full"))
        if method == "full" or full is None:
            continue
        again = refreshing.get((engine, method))
        mem = census.get((engine, method))
        state = (f"{(mem['census_optimizer'] + mem.get('census_projectors', 0)) / MIB:.2f} / "
                 f"{(mem['expected_optimizer'] + mem.get('expected_projectors', 0)) / MIB:.2f}" if mem else "-")
        body.append([engine, method, f"{r['examples_per_s'] / full['examples_per_s']:.2f}x",
                     f"{r['bytes_per_update'] / MIB:.2f}", f"{again['bytes_per_update'] / MIB:.2f}" if again else "-",
                     f"{full['bytes_per_update'] / MIB:.2f}", state])
    return "\n\n".join([
        "## GaLore and Fira per engine (`relora-bench`, `relora-memprof`)",
        f"{_machine(bench)} Preset {r0['preset']}, vocab {_arg(bench, '--vocab-size', 32100)}, seq {r0['seq_len']}, "
        f"{r0['dtype']}, {r0['world_size']} ranks, micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']} "
        f"accumulation, rank {_arg(bench, '--rank', 128)}. {_timing(r0)} An ordinary update refreshes nothing "
        f"(T = {_arg(bench, '--update-gap', 200)}); the refresh column is the same run with `--update-gap 1`, where every "
        "update computes every projector (ZeRO-3 gathers each matrix's slices to an owner; the other engines hold it "
        "whole where it is computed) and broadcasts P where ranks share a matrix. Bytes include every collective. "
        "Optimizer state: the census of Adam moments and projectors on rank 0 against the exact accounting "
        "(`perf.accounting`: 2 r max(m, n) moments and r min(m, n) of P per projection; on ZeRO-3 and FSDP2 the "
        "left-projected matrices' moments are whole on every rank; ZeRO adds the rows a partition boundary cuts, kept "
        "by both ranks).",
        _table(header, body),
    ])


def projection_side_section(std: dict, right: dict, collectives: dict | None, modelled: list[dict]) -> str:
    """GaLore / Fira's official projection (std) against the named variant --galore-proj right, per engine: the bytes
    the left-projected matrices' all-reduce adds where rows are split, and the speed of each against full rank in its
    own invocation; the two collective patterns timed on real ranks; the model at 1B and 7B."""
    rows_std = {(r["engine"], r["method"]): r for r in std["rows"]}
    rows_right = {(r["engine"], r["method"]): r for r in right["rows"]}
    header = ["engine", "method", "std MiB sent/update", "right MiB sent/update", "std adds MiB", "std ex/s vs full",
              "right ex/s vs full"]
    body = []
    for (engine, method), r in rows_std.items():
        other, full, full_right = rows_right.get((engine, method)), rows_std.get((engine, "full")), rows_right.get((engine, "full"))
        if method == "full" or not (other and full and full_right):
            continue
        body.append([engine, method, f"{r['bytes_per_update'] / MIB:.2f}", f"{other['bytes_per_update'] / MIB:.2f}",
                     f"{(r['bytes_per_update'] - other['bytes_per_update']) / MIB:.3f}",
                     f"{r['examples_per_s'] / full['examples_per_s']:.2f}x",
                     f"{other['examples_per_s'] / full_right['examples_per_s']:.2f}x"])
    r0 = std["rows"][0]
    parts = [
        "## GaLore's projection side per engine (`relora-bench --galore-proj`, `projection_collectives.py`, "
        "`relora-perfmodel projection`)",
        f"{_machine(std)} Preset {r0['preset']}, vocab {_arg(std, '--vocab-size', 32100)}, seq {r0['seq_len']}, "
        f"{r0['dtype']}, {r0['world_size']} ranks, micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']} "
        f"accumulation, rank {_arg(std, '--rank', 128)}, T = {_arg(std, '--update-gap', 200)}. {_timing(r0)} The std and "
        "right rows come from two invocations, each with full rank beside it (the ex/s columns are each against "
        "its own invocation's full rank). std is the official projection (down_proj from the left): where an "
        "engine splits rows (ZeRO-3, FSDP2; ZeRO-1/2 only for a matrix a partition boundary cuts) each update "
        "all-reduces the left-projected matrices' partial products; right needs none.",
        _table(header, body),
    ]
    if collectives:
        c0 = collectives["rows"][0]
        parts += [f"The two ways to sum R on split rows, timed alone: all-reduce (relora_dist: every rank keeps the "
                  "matrix's moments whole) against reduce-scatter into column shards plus the all-gather the rows' "
                  f"update needs back (N; Fira: N and R). {_machine(collectives)} {c0['world_size']} ranks, one bucket "
                  "per update at GaLore's official rank for the size, the median of the repeats.",
                  _table(["preset", "rank", "pattern", "payload MiB", "MiB sent per rank", "ms", "moments MiB per rank"],
                         [[r["preset"], r["rank"], r["pattern"], f"{r['payload_bytes'] / MIB:.2f}",
                           f"{r['sent_bytes_per_rank'] / MIB:.2f}", f"{1e3 * r['seconds']:.2f}",
                           f"{r['moment_bytes_per_rank'] / MIB:.2f}"] for r in collectives["rows"]])]
    if modelled:
        parts += ["Modelled (`relora-perfmodel projection`, FSDP2 / ZeRO-3 at bf16 parameters; an a-priori bus "
                  "bandwidth per profile):",
                  _table(["preset", "rank", "GPUs", "all-reduce MiB sent per rank", "ms", "engine's own MiB sent per rank",
                          "ms", "added bytes", "moments kept whole, GiB per rank"],
                         [[m["preset"], m["rank"], f"{m['world_size']}x {m['hardware']}",
                           f"{m['reduce_sent_bytes'] / MIB:.0f}", f"{1e3 * m['reduce_s']:.2f}",
                           f"{m['engine_sent_bytes'] / MIB:.0f}", f"{1e3 * m['engine_s']:.1f}",
                           f"+{m['reduce_sent_bytes'] / m['engine_sent_bytes']:.1%}",
                           f"{m['whole_moments_extra_bytes'] / 2**30:.2f}"] for m in modelled])]
    return "\n\n".join(parts)


def switchlora_section(bench: dict) -> str:
    """SwitchLoRA and ReLoRA against full rank per engine: speed and bytes per update, the switch's own bytes apart
    (the paper reports 54% less communication than full rank)."""
    rows = {(r["engine"], r["method"]): r for r in bench["rows"]}
    r0 = bench["rows"][0]
    header = ["engine", "method", "ex/s vs full", "MiB sent/update", "+ switch or merge MiB (amortised)", "vs full rank's bytes"]
    body = []
    for (engine, method), r in rows.items():
        full = rows.get((engine, "full"))
        if method == "full" or full is None:
            continue
        periodic = (r.get("merge_reset_bytes") or 0) / max(r.get("merge_every") or 1, 1) if method == "relora" else \
            (r.get("merge_reset_bytes") or 0)
        body.append([engine, method, f"{r['examples_per_s'] / full['examples_per_s']:.2f}x", f"{r['bytes_per_update'] / MIB:.2f}",
                     f"{periodic / MIB:.3f}", f"{(r['bytes_per_update'] + periodic) / full['bytes_per_update'] - 1:+.0%}"])
    return "\n\n".join([
        "## SwitchLoRA per engine (`relora-bench`)",
        f"{_machine(bench)} Preset {r0['preset']}, vocab {_arg(bench, '--vocab-size', 32100)}, seq {r0['seq_len']}, "
        f"{r0['dtype']}, {r0['world_size']} ranks, micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']} "
        f"accumulation, rank {_arg(bench, '--rank', 128)}, the methods' updates interleaved. {_timing(r0)} SwitchLoRA "
        "at its starting switch rate (r / 40 vectors a side and layer per update); the switch's bytes are its one fetch "
        "per update (ReLoRA's merge and reset amortised over --merge-every). The paper's -54% is against full-rank "
        "data parallelism: DDP and ZeRO-1/2 reduce only the factors' gradients. FSDP2 and ZeRO-3 gather the frozen W "
        "anyway; the candidate pools are a module no forward calls, which FSDP2 shards as its own unit and ZeRO-3 keeps "
        "partitioned (never persistent), so only the switch's fetch moves them (docs/METHODS.md).",
        _table(header, body),
    ])


def sst_section(bench: dict, forward: dict | None = None) -> str:
    """SST against full rank per engine: speed, bytes per update (the gradients and the projection's all-reduce of
    column norms), and the bytes of each resample and re-SVD with their periods; the forward's rule apart."""
    rows = {(r["engine"], r["method"]): r for r in bench["rows"]}
    r0 = bench["rows"][0]
    header = ["engine", "ex/s vs full", "MiB sent/update", "of which projection KiB", "resample MiB (every)",
              "re-SVD MiB (every)", "vs full rank's bytes (amortised)"]
    body = []
    for (engine, method), r in rows.items():
        full = rows.get((engine, "full"))
        if method != "sst" or full is None:
            continue
        events = r.get("events", {})
        project, resample, resvd = (events.get(name, {"bytes": 0, "every": 1}) for name in ("project", "resample", "resvd"))
        amortised = r["bytes_per_update"] + project["bytes"] + resample["bytes"] / resample["every"] \
            + resvd["bytes"] / resvd["every"]
        body.append([engine, f"{r['examples_per_s'] / full['examples_per_s']:.2f}x",
                     f"{(r['bytes_per_update'] + project['bytes']) / MIB:.2f}", f"{project['bytes'] / 1024:.1f}",
                     f"{resample['bytes'] / MIB:.3f} ({resample['every']})", f"{resvd['bytes'] / MIB:.2f} ({resvd['every']})",
                     f"{amortised / full['bytes_per_update'] - 1:+.0%}"])
    parts = [
        "## SST per engine (`relora-bench`)",
        f"{_machine(bench)} Preset {r0['preset']}, vocab {_arg(bench, '--vocab-size', 32100)}, seq {r0['seq_len']}, "
        f"{r0['dtype']}, {r0['world_size']} ranks, micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']} "
        f"accumulation, rank {_arg(bench, '--rank', 128)}, the factored forward, the methods' updates interleaved. "
        f"{_timing(r0)} Bytes per update: the gradients (sigma and the active columns of U and V, with the dense "
        "embeddings, norms and head) and the all-reduce of every active column's sum of squares after the step; a "
        "resample fetches the rows each rank's pieces cover (nothing on the row-sharded engines, where U and its active "
        "copy hold the same rows) and gathers sigma; a re-SVD fetches each layer whole to its owner and all-reduces "
        "the result (docs/METHODS.md). Periods in updates: --sst-iteration-steps and a round of ceil(k / r) iterations.",
        _table(header, body),
    ]
    if forward is not None:
        cases = forward["rows"]
        parts += [f"The forward (`benchmarks/sst_forward.py`, one layer, {forward.get('threads', 1)} thread, r "
                  f"{cases[0]['rank']}; `--sst-forward auto` picks the fewer FLOPs, the faster one in "
                  f"{forward['auto_agrees']} of {len(cases)} cases):",
                  _table(["shape", "in x out", "tokens", "factored ms", "dense ms", "dense / factored", "auto picks"],
                         [[c["shape"], f"{c['in']} x {c['out']}", c["tokens"], c["factored_ms"], c["dense_ms"],
                           f"{c['dense_over_factored']:.2f}", c["auto_picks"]] for c in cases])]
    return "\n\n".join(parts)


def _timing(row: dict) -> str:
    updates = len(row["update_s_all"])
    if row.get("interleaved"):
        return (f"Per engine every method's case stays alive and their updates alternate (`--interleave`, so the box's "
                f"drift hits all alike); the median of {updates} updates after the warm-up ones.")
    return f"One method after another; the median of {updates} updates after the warm-up ones."


def _activations(row: dict) -> str:
    measured = f"{row['activation_bytes_per_token'] / 1024:.1f}"
    layers = row.get("layer_activation_bytes_per_token")
    return measured if layers is None else f"{measured} ({layers / 1024:.1f})"


def memory_section(data: dict, title: str = "Memory per rank", plot: str | None = "memory.png") -> str:
    rows = data["rows"]
    r0 = rows[0]
    cats = ("parameters", "gradients", "optimizer", "projectors", "master", "other")
    cats = tuple(c for c in cats if any(r.get(f"census_{c}") for r in rows) or c != "projectors")  # GaLore's only
    header = ["engine", "method", *[f"{c} MiB" for c in cats], "static census / expected MiB", "peak MiB",
              "activations KiB/token (layers by formula)", f"largest micro-batch in {r0['gpu_memory_gb']:g} GB"]
    body = [[r["engine"], r["method"], *[f"{r.get(f'census_{c}', 0) / MIB:.1f}" for c in cats],
             f"{r['static_census'] / MIB:.1f} / {r['static_expected'] / MIB:.1f}", f"{r['peak_sampled'] / MIB:.0f}",
             _activations(r), r["largest_micro_batch"]] for r in rows]
    return "\n\n".join([
        f"## {title} (`relora-memprof`)",
        f"{_machine(data)} Preset {r0['preset']}, vocab {_arg(data, '--vocab-size', 32100)}, seq {r0['seq_len']}, "
        f"{r0['dtype']}, {r0['world_size']} ranks, micro-batch {r0['micro_batch_size']}. "
        f"Census of live tensors between the last backward and the step; peak = {r0['peak_source']} sampled in a "
        "background thread (whole process: Python, libraries and engine buffers included). 'other' holds engine "
        "buffers the census cannot attribute (DeepSpeed's gradient buckets, ZeRO-3's persistent copies).",
        _table(header, body),
        "Where the census and the expectation differ, the engine keeps the category where the census cannot name it: "
        "ZeRO-2's reduced gradient partitions and ZeRO-3's fp32 partitions land in 'other'; ZeRO-3 also keeps "
        "small parameters whole (persistence threshold); fairscale OSS assigns whole parameters to owners unevenly. "
        "On a CPU the peak column is the process's RSS, and every case runs after the ones above it in the same "
        "process, whose freed memory stays with it: the column is a running maximum down the table, not a per-method "
        "figure. The census, activation and micro-batch columns are per case. Activations: saved-for-backward bytes "
        "measured with saved_tensors_hooks on one sequence; in brackets the decoder layers' share by the exact per-layer "
        "accounting (`relora_dist.perf.activations.layer_bytes_per_token`; the rest is the embeddings, final norm and "
        "loss).",
        *([f"![memory breakdown](benchmarks/results/{plot})"] if plot else []),
    ])


def slow_link_section(data: dict) -> str:
    s = data["settings"]
    header = ["busbw GB/s", "full s/update measured / model", "ReLoRA s/update measured / model", "speedup measured",
              "speedup model", "full/ReLoRA ratio error"]
    rows = {(r["busbw_gbs"], r["method"]): r for r in data["rows"]}
    body = [[f"{sp['busbw_gbs']:.3f}",
             f"{rows[sp['busbw_gbs'], 'full']['measured_update_s']:.3f} / {rows[sp['busbw_gbs'], 'full']['predicted_update_s']:.3f}",
             f"{rows[sp['busbw_gbs'], 'relora']['measured_update_s']:.3f} / {rows[sp['busbw_gbs'], 'relora']['predicted_update_s']:.3f}",
             _pct(sp["measured_speedup"]), _pct(sp["predicted_speedup"]), _pct(sp["ratio_error"])] for sp in data["speedups"]]
    cpu = data["cpu_profile"]
    return "\n\n".join([
        "## Slow-link sweep: measured vs the performance model (`benchmarks/slow_link.py`)",
        f"{_machine(data)} 2 gloo ranks x 1 thread, DDP all-reducing after every micro-batch (the paper's loop), "
        f"preset {s['preset']}, vocab {s['vocab_size']}, seq {s['seq_len']}, r={s['rank']}, micro-batch "
        f"{s['micro_batch_size']} x {s['accumulation_steps']}. The first row is the real gloo link; the others pad "
        f"every bucket's all-reduce to the emulated bus bandwidth. Model inputs measured on the spot: fp32 GEMM "
        f"{cpu['fp32_flops'] / 1e9:.0f} GFLOP/s, copy {cpu['mem_bw'] / 1e9:.1f} GB/s, dropout "
        f"{(cpu.get('dropout_rate') or 0) / 1e6:.0f} M elements/s, gloo busbw {cpu['busbw'] / 1e9:.2f} GB/s; one "
        f"fitted scalar, eta_mm = {data['eta_mm']:.3f}, on the real-link full-rank point only.",
        _table(header, body),
        "![slow-link sweep](benchmarks/results/slow_link.png)",
    ])


def table4_section(rows: list[dict]) -> str:
    header = ["setup", "method", "predicted ex/s", "paper ex/s", "error", "micro-batch", "fitted on", "note"]
    body = [[r["setup"], r["method"], f"{r['predicted']:.1f}", r["paper"], _pct(r["error"]), r["micro_batch"],
             r["fitted_on"] if r["fitted"] else "out of sample", "fitted" if r["fitted"] else
             ("within 10%" if r["meets_goal"] else "MISS: " + r["reason"].split(":")[0])] for r in rows]
    speed = {r["setup"]: r for r in rows}
    speed_rows = [[k, _pct(v["speedup_predicted"]), _pct(v["speedup_paper"]), f"{v['warm_start_harmonic_predicted']:.1f}",
                   f"{v['warm_start_harmonic_paper']:.1f}", v["warm_start_paper"]] for k, v in speed.items()]
    misses = [f"- {r['setup']} {r['method']}: {r['reason']}" for r in rows if r.get("reason")]
    return "\n\n".join([
        "## The paper's hardware table, predicted (`relora-perfmodel table4`)",
        "Analytic model (`relora_dist/perf/model.py`), no measurement: LLaMA 1.3B, seq 512, pure bf16, DDP all-reducing "
        "every micro-batch, global examples/s. One GEMM efficiency per GPU type, fitted on that GPU's full-rank "
        "figure only; every ReLoRA figure is out of sample.",
        _table(header, body),
        _table(["setup", "speedup model", "speedup paper", "warm-start (harmonic) model", "harmonic from paper figures",
                "paper's warm-start column"], speed_rows),
        "Misses of the 10% goal and why:\n" + ("\n".join(misses) if misses else "none"),
    ])


LORA_PATH_VARIANTS = {  # file-name prefix in results/lora_path/: what the ReLoRA rows ran
    "before": "s * (x A^T) B^T added out of place, one mask per module (the path of commit 17953e8)",
    "per_module": "scale on the small factors, added in place; one mask per module (the default)",
    "shared": "as per_module, plus --shared-lora-input: one mask and one GEMM per q/k/v and gate/up group",
    "shared_bits16": "as shared, plus --lora-dropout-mask bits16: the mask cut from 16 random bits an element",
}


def lora_path_section(runs: dict[str, dict], *, interleaved: bool = False) -> str:
    """ReLoRA/full from repeated relora-bench invocations (`{variant}_{eager|compile}_{repeat}.json`): each ratio taken
    within one invocation (full and ReLoRA measured minutes apart, or update against update with --interleave),
    then the median and range over the repeats."""
    ratios: dict[tuple, list[float]] = {}
    full_rate: dict[tuple, list[float]] = {}
    flop_model: dict[str, float] = {}
    for name, data in runs.items():
        variant, mode, _repeat = name.rsplit("_", 2)
        by = {(r["engine"], r["method"]): r for r in data["rows"]}
        for (engine, method), full in by.items():
            if method != "full" or (engine, "relora") not in by:
                continue
            relora = by[(engine, "relora")]
            ratios.setdefault((engine, mode, variant), []).append(relora["examples_per_s"] / full["examples_per_s"])
            full_rate.setdefault((engine, mode), []).append(full["examples_per_s"])
            flop_model[engine] = full["executed_flops_per_token"] / relora["executed_flops_per_token"]
    variants = [v for v in LORA_PATH_VARIANTS if any(key[2] == v for key in ratios)]
    header = ["engine", "mode", "full ex/s (median)", *[f"ReLoRA / full: {v}" for v in variants], "FLOP model",
              "best measured / model"]
    body = []
    for engine, mode in dict.fromkeys((e, m) for e, m, _ in ratios):
        cells = []
        for variant in variants:
            xs = ratios.get((engine, mode, variant))
            cells.append("-" if not xs else f"{median(xs):.2f}x" + (f" ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})" if len(xs) > 1 else " (n=1)"))
        best = max(median(xs) for (e, m, _), xs in ratios.items() if (e, m) == (engine, mode))
        body.append([engine, mode, f"{median(full_rate[(engine, mode)]):.2f}", *cells, f"{flop_model[engine]:.2f}x",
                     f"{best / flop_model[engine]:.2f}"])
    any_run = next(iter(runs.values()))
    r0 = any_run["rows"][0]
    updates = len(r0["update_s_all"])
    if interleaved:
        title = "## ReLoRA's unfused path against full rank (`relora-bench --interleave`)"
        how = (f"per invocation the median of {updates} updates after the warm-up updates (which absorb the compilation), "
               "full rank's and ReLoRA's alternated update by update on the same engine (both cases alive, `--interleave`), "
               "so the box's drift hits both alike; the variants' invocations alternated.")
    else:
        title = "## ReLoRA's unfused path against full rank (`relora-bench`, repeated)"
        how = (f"per invocation the median of {updates} updates after 2 warm-up updates (which absorb the compilation), "
               "full rank and ReLoRA in the same invocation; the variants' invocations alternated. The same case moved by "
               "up to 10-20% between repeats on this box (the ranges), more than the variants differ: the interleaved "
               "tables are the cleaner comparison.")
    return "\n\n".join([
        title,
        f"{_machine(any_run)} Preset {r0['preset']}, seq {r0['seq_len']}, {r0['dtype']}, {r0['world_size']} ranks x 1 thread, "
        f"micro-batch {r0['micro_batch_size']} x {r0['accumulation_steps']}, ReLoRA r={next(r['rank'] for r in any_run['rows'] if r['rank'])}, "
        f"LoRA dropout 0.1; {how} FLOP model: full rank's executed FLOPs per token over ReLoRA's. Variants:",
        "\n".join(f"- `{k}`: {v}" for k, v in LORA_PATH_VARIANTS.items() if k in variants),
        _table(header, body),
    ])


def lora_path_ab_section(runs: list[dict]) -> str:
    """benchmarks/lora_path.py: the path's variants and full rank interleaved in one process, per LoRA dropout."""
    header = ["LoRA dropout", "variant", "forward ms", "backward ms", "fwd+bwd ms", "full / variant"]
    body = [[f"{data['config']['lora_dropout']:g}", r["variant"], f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}",
             f"{r['fwd_bwd_ms']:.1f}", f"{r['speed_vs_full']:.3f}x"] for data in runs for r in data["rows"]]
    c = runs[0]["config"]
    return "\n\n".join([
        "## ReLoRA's unfused path, variants interleaved in one process (`benchmarks/lora_path.py`)",
        f"{_machine(runs[0])} Preset {c['preset']}, vocab {c['vocab_size']}, seq {c['seq_len']}, micro-batch {c['micro_batch_size']}, "
        f"fp32, r {c['rank']}, {c['threads']} thread; each round one forward + backward of every variant on the same batch, "
        f"the median over {', '.join(str(d['config']['rounds']) for d in runs)} rounds after {c['warmup_rounds']} warm-up rounds. "
        "Variants: `before` adds s·(x A^T) B^T out of place (the path of commit 17953e8), `per_module` is the default now "
        "(scale on the small factors, added in place), `shared` adds --shared-lora-input, `shared_bits16` adds "
        "--lora-dropout-mask bits16 to that (at LoRA dropout 0 it is `shared`: no mask is drawn).",
        _table(header, body),
    ])


LORA_INPUT_QUALITY_ROWS = {  # relora-compare row: (column, what it changes against the default relora row)
    "relora_shared": ("shared per group", "one mask per q/k/v and gate/up group"),
    "relora_bits16": ("bits16 mask", "the mask cut from 16 random bits an element"),
}


def lora_input_quality_section(seeds: dict[str, list[dict]]) -> str:
    """The relora row of relora-compare's tiny_docs preset (formerly benchmarks/quality.py) against its LoRA-input variants (LORA_INPUT_QUALITY_ROWS), same seed and
    data; per seed the quality.json files of results/quality_shared (a variant's rows may come from its own run)."""
    by_seed = {seed: {r["row"]: r for data in files for r in data["runs"]} for seed, files in sorted(seeds.items())}
    variants = [row for row in LORA_INPUT_QUALITY_ROWS if all(row in rows for rows in by_seed.values())]
    body, losses = [], {row: [] for row in ["relora", *variants]}
    for seed, rows in by_seed.items():
        for row in losses:
            losses[row].append(rows[row]["val_loss"])
        cells = [f"{rows['relora']['val_loss']:.4f} ({rows['relora']['val_ppl']:.2f})"]
        for row in variants:
            cells += [f"{rows[row]['val_loss']:.4f} ({rows[row]['val_ppl']:.2f})", f"{rows[row]['val_loss'] - rows['relora']['val_loss']:+.4f}"]
        body.append([seed, *cells])
    mean = {row: sum(v) / len(v) for row, v in losses.items()}
    body.append(["mean", f"{mean['relora']:.4f}", *[c for row in variants for c in (f"{mean[row]:.4f}", f"{mean[row] - mean['relora']:+.4f}")]])
    spread = max(losses["relora"]) - min(losses["relora"])
    any_run = next(iter(seeds.values()))[0]
    s = any_run["settings"]
    labels = {row: LORA_INPUT_QUALITY_ROWS[row][0] for row in variants}
    header = ["seed", "per-module ATen masks (default)", *[c for row in variants for c in (labels[row], f"{labels[row]} - default")]]
    return "\n\n".join([
        "## The LoRA input variants (`--shared-lora-input`, `--lora-dropout-mask bits16`), quality",
        f"{_machine(any_run)} `relora-compare --preset tiny_docs --methods relora,{','.join(variants)} --lrs "
        f"{','.join(f'{lr:g}' for lr in sorted({r['lr'] for r in any_run['runs']}))} --seeds N` (measured with its "
        f"predecessor `benchmarks/quality.py --preset {any_run['preset']}`, the same runs): the `relora` row of the "
        f"earlier quality table below (model {s.get('model', '?')}, LoRA dropout 0.1) against "
        f"{' and against '.join(LORA_INPUT_QUALITY_ROWS[row][1] for row in variants)}; same seed, same data. Final validation loss "
        f"(perplexity); the default row's spread over seeds is {spread:.4f}.{_other_boxes(seeds, any_run)}",
        _table(header, body),
    ])


def _other_boxes(seeds: dict[str, list[dict]], shown: dict) -> str:
    """Where a table's runs came from more than one session's box: which rows ran elsewhere."""
    elsewhere = sorted({r["row"] for files in seeds.values() for data in files
                        if data["machine"]["platform"] != shown["machine"]["platform"] for r in data["runs"]})
    return f" The rows {', '.join(elsewhere)} ran in another session, on a box of the same kind." if elsewhere else ""


def loop_overhead_section(runs: list[dict]) -> str:
    """One table per measuring mode (interleaved first: the cleaner comparison)."""
    parts = ["## Training-loop overhead (`benchmarks/loop_overhead.py`)"]
    for data in runs:
        parts += _loop_overhead_table(data)
    return "\n\n".join(parts)


def _loop_overhead_table(data: dict) -> list[str]:
    header = ["phase", "ours ms/update", "bare DDP loop ms/update", "bare / ours", "median paired ratio",
              "ours per repeat", "bare per repeat", "ratio per repeat"]
    body = [[r["phase"], f"{r['ours_ms']:.1f}", f"{r['bare_ms']:.1f}", f"{r['ratio_bare_over_ours']:.3f}x",
             f"{r['paired_ratio_median']:.3f}x" if "paired_ratios" in r else "-",
             ", ".join(f"{x:.0f}" for x in r["ours_samples_ms"]), ", ".join(f"{x:.0f}" for x in r["bare_samples_ms"]),
             ", ".join(f"{x:.3f}" for x in r.get("paired_ratios", []))]
            for r in data["rows"]]
    c = data["config"]
    if c.get("mode", "separate") == "interleaved":
        how = (f"`--mode interleaved`, {c['repeats']} repeats, each one job in which the bare loop takes the same update "
               "on its own copy of the model right after each of ours (a drifting box slows both alike, and both share "
               "the trainer's allocator setting); per phase the "
               "median per-update interval (merges and the switch left out), then the median over repeats; the paired "
               "ratio is each repeat's bare / ours.")
    else:
        how = (f"`--mode separate`, {c['repeats']} alternating repeats of separate jobs (`launch/train.py` with its default "
               "`--keep-host-memory`, then the bare loop under glibc's defaults); per phase the median per-update interval (merges and the switch left out), then the median over "
               "repeats; the paired ratio is each repeat's bare / ours (its two runs back to back).")
    return [f"{_machine(data)} Our trainer against a hand-written DDP loop on the same model and global batches "
            f"({' '.join(c['train_args'])}), {c['nproc']} gloo ranks x {c['threads']} thread, {how}",
            _table(header, body), *_paired_spread(data["rows"])]


def _paired_spread(rows: list[dict]) -> list[str]:
    """What the repeats can resolve: a ratio goal inside the per-repeat spread is not shown met or missed."""
    ratios = [x for r in rows for x in r.get("paired_ratios", [])]
    if len(ratios) < 2:
        return []
    return [f"Per-repeat ratios span {min(ratios):.3f}-{max(ratios):.3f}x on this box: differences between ours and "
            "the bare loop smaller than that spread are not resolved by these repeats."]


def compare_section(report: dict, folder: str) -> str:
    """relora-compare's table (compare.md) with what it does and does not show, the reading of its orderings
    (notes.md beside it, written by whoever ran it), and its plots."""
    rows = report["rows"]
    bracketed = sum(r["bracketed"] for r in rows.values())
    repeated = sum(len(r["seeds"]) > 1 for r in rows.values())
    reproduced = [c for c in report["orderings"] if c["reproduced"]]
    return "\n\n".join([
        f"## Every method at one token budget (`relora-compare --preset {report['preset']}`)",
        f"{len(rows)} rows, {len(report['runs'])} runs, {report['tokens_per_run'] / 1e6:.2f}M tokens each. "
        f"{bracketed} of {len(rows)} best LRs are bracketed by the sweep (a row marked `no` may do better at an LR not "
        f"tried yet); {repeated} rows repeat their best LR on a second seed, the others are one seed. "
        f"{len(reproduced)} of the paper's {len(report['orderings'])} orderings hold here. What this shows: the methods "
        "against each other on the same data, batches, tokens and tuning budget, at a scale where the projections "
        "hold most of the parameters. What it does not: the paper's scale (its 60M / 130M C4 perplexities stand beside "
        "ours for their orderings, not their values: another corpus, tokenizer and 700-1600x more tokens), nor speed on "
        "a GPU (tokens/s here are one CPU thread per run; bytes per update are exact and do not depend on the device).",
        (Path(folder) / "compare.md").read_text().strip(),
        *([(Path(folder) / "notes.md").read_text().strip()] if (Path(folder) / "notes.md").exists() else []),
        f"![validation loss]({folder}/val_loss.png) ![LR sweeps]({folder}/lr_sweep.png) ![perplexity]({folder}/ppl.png)"
        + (f" ![update spectra]({folder}/spectrum.png)" if report.get("spectrum") else ""),
    ])


def quality_section(table: Path) -> str:
    folder = table.parent.as_posix()
    return "\n\n".join([
        "## Training quality at small scale, the earlier preset (`relora-compare --preset tiny_docs`, measured with "
        "its predecessor `benchmarks/quality.py --preset cpu`)",
        "The paper's method comparison and Table 1 ablation on the embedded corpus, one token budget for every row, "
        "the best of a small learning-rate sweep per row; the paper's C4 perplexities beside ours (different data, "
        "tokenizer and scale: compare orderings, not values). Then the update spectra (paper Figure 5).",
        "Read with care: in the `tiny` model about 70% of the parameters are the embeddings and the head, which "
        "every row trains full rank, and low-rank phases run at twice the full-rank LR (the paper's recipe). Rows "
        "that are low rank from the first update therefore train the embeddings at 2x LR throughout, while warm-started "
        "rows spend their first quarter at 1x: at this scale the table measures that as much as the low-rank "
        "mechanisms. What does reproduce is the spectrum: ReLoRA's update is numerically full rank (sums of rank-r "
        "cycles) with an effective rank close to full-rank training's, while LoRA + WS stays at rank r.",
        table.read_text().strip(),
        f"![validation loss]({folder}/val_loss.png) ![update spectra]({folder}/spectrum.png)",
    ])


def data_section(data: dict) -> str:
    """benchmarks/data.py: relora-data prepare against the authors' recipe; start-up, memory and reads per store size."""
    lines = ["## Data: the token store (`benchmarks/data.py`)", "", _machine(data)]
    prepare = data.get("prepare") or []
    if prepare:
        lines += ["", f"Prepare: each pipeline in a process of its own, alternating, the median of {len(prepare[0]['ours_s'])};"
                  f" the same JSONL corpus, BPE tokenizer (vocab 4096) and {prepare[0]['num_proc']} worker processes. The"
                  " authors' recipe is ReLoRA's pretokenize.py re-expressed: `load_dataset`, `map(tokenize + eos, num_proc)`,"
                  " `map(group_texts, num_proc)` (sequences of 256), `save_to_disk`. \"After the imports\" times each from"
                  " loading the tokenizer to its last file written; \"whole process\" adds the interpreter and the imports"
                  " (`import relora_dist` alone is about 3 s here, its model architectures registering with transformers).",
                  ""]
        lines.append(_table(
            ["corpus", "tokens", "ours, after the imports", "theirs, after the imports", "speed-up",
             "ours, whole process", "theirs, whole process", "speed-up", "bytes a token (ours / theirs)"],
            [[f"{r['corpus']} ({r['corpus_bytes'] / 1e6:.0f} MB)", f"{r['tokens'] / 1e6:.1f}M",
              f"{r['ours_prepare_tokens_per_s'] / 1e6:.2f}M tokens/s ({median(r['ours_prepare_s']):.1f} s)",
              f"{r['theirs_prepare_tokens_per_s'] / 1e6:.2f}M tokens/s ({median(r['theirs_prepare_s']):.1f} s)",
              f"{r['prepare_speedup']:.2f}x",
              f"{r['ours_tokens_per_s'] / 1e6:.2f}M tokens/s ({median(r['ours_s']):.1f} s)",
              f"{r['theirs_tokens_per_s'] / 1e6:.2f}M tokens/s ({median(r['theirs_s']):.1f} s)", f"{r['speedup']:.2f}x",
              f"{r['ours_bytes_per_token']:.2f} / {r['theirs_bytes_per_token']:.2f}"] for r in prepare]))
    startup = data.get("startup") or []
    if startup:
        n = startup[0]["nproc"]
        lines += ["", f"Start-up and memory: relora-train on {n} gloo ranks (20m, seq 256, global batch 8, micro-batch 4,"
                  " full rank), stores of random ids (reading is measured, not tokenizing). Start-up"
                  " is the seconds from process start to the end of the first update minus the model build (the slowest"
                  " rank); data is the data stage alone (opening the stores, rank 0 verifying the checksums); peak RSS is"
                  " each rank's maximum resident set at the first update. The first launch verifies every checksum, the"
                  " second finds this machine's record of them. Reads: the seconds a rank spends reading its micro-batches"
                  " for an update, against the update's.", ""]
        rows = []
        for r in startup:
            rows.append([r["size"], r["launch"], f"{r['startup_s']:.2f}", f"{r['data_s']:.2f}",
                         " / ".join(f"{m:.0f}" for m in r["max_rss_mib"]),
                         f"{1e3 * r['read_s']:.3f} ms ({100 * r['read_s'] / r['update_s']:.3f}%)"])
        lines.append(_table(["store", "launch", "start-up s", "data s", "peak RSS MiB per rank", "reads an update (of the update)"],
                            rows))
        by = {(r["size"], r["launch"]): r for r in startup}
        sizes = list(dict.fromkeys(r["size"] for r in startup))
        if len(sizes) > 1:
            a, b = by[(sizes[0], "second")], by[(sizes[-1], "second")]
            fa, fb = by[(sizes[0], "first")], by[(sizes[-1], "first")]
            growth = max(y - x for x, y in zip(a["max_rss_mib"], b["max_rss_mib"]))
            lines += ["", f"From {sizes[0]} to {sizes[-1]} tokens: the data stage {b['data_s'] - a['data_s']:+.2f} s (first"
                      f" launches, checksums verified: {fb['data_s'] - fa['data_s']:+.2f} s); start-up"
                      f" {b['startup_s'] - a['startup_s']:+.2f} s (first launches {fb['startup_s'] - fa['startup_s']:+.2f} s);"
                      f" peak RSS per rank {growth:+.0f} MiB at most. One launch per row: a repeated launch on one store"
                      " has moved start-up by up to 0.9 s and peak RSS by up to 35 MiB on this box, so the data stage is"
                      " the precise measure of what the store's size costs."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--out", default="BENCHMARKS.md")
    args = p.parse_args(argv)
    results = Path(args.results)
    sections = ["# Benchmarks\n\nGenerated by `python benchmarks/report.py` from `benchmarks/results/`; rerun the "
                "commands in `benchmarks/README.md` to refresh. Every section names the machine that measured it."]
    for name, render in (("perfmodel_table4.json", table4_section), ("slow_link.json", slow_link_section),
                         ("throughput.json", throughput_section), ("memory.json", memory_section)):
        path = results / name
        if path.exists():
            sections.append(render(json.loads(path.read_text())))
    if (results / "throughput_projected.json").exists():
        optional = {name: json.loads((results / name).read_text()) if (results / name).exists() else None
                    for name in ("throughput_projected_refresh.json", "memory_projected.json")}
        sections.append(projected_section(json.loads((results / "throughput_projected.json").read_text()),
                                          *optional.values()))
    if (results / "throughput_projected.json").exists() and (results / "throughput_projected_right.json").exists():
        optional = results / "projection_collectives.json"
        sections.append(projection_side_section(
            json.loads((results / "throughput_projected.json").read_text()),
            json.loads((results / "throughput_projected_right.json").read_text()),
            json.loads(optional.read_text()) if optional.exists() else None,
            [json.loads(f.read_text()) for f in sorted(results.glob("perfmodel_projection_*.json"))]))
    if (results / "throughput_switchlora.json").exists():
        sections.append(switchlora_section(json.loads((results / "throughput_switchlora.json").read_text())))
    if (results / "memory_sst.json").exists():
        sections.append(memory_section(json.loads((results / "memory_sst.json").read_text()), "SST memory per rank",
                                       plot=None))
    if (results / "throughput_sst.json").exists():
        forward = results / "sst_forward.json"
        sections.append(sst_section(json.loads((results / "throughput_sst.json").read_text()),
                                    json.loads(forward.read_text()) if forward.exists() else None))
    lora_path = sorted((results / "lora_path").glob("*.json"))
    if lora_path:
        sections.append(lora_path_section({f.stem: json.loads(f.read_text()) for f in lora_path}))
    interleaved = sorted((results / "lora_path_interleaved").glob("*.json"))
    if interleaved:
        sections.append(lora_path_section({f.stem: json.loads(f.read_text()) for f in interleaved}, interleaved=True))
    ab = [json.loads(f.read_text()) for f in sorted(results.glob("lora_path_ab*.json"), reverse=True)]
    if ab:
        sections.append(lora_path_ab_section(ab))
    input_quality: dict[str, list[dict]] = {}
    for f in sorted((results / "quality_shared").glob("*seed*.json")):  # seedN.json, VARIANT_seedN.json
        input_quality.setdefault(f.stem.rpartition("seed")[2], []).append(json.loads(f.read_text()))
    if input_quality:
        sections.append(lora_input_quality_section(input_quality))
    overhead = [json.loads(f.read_text()) for f in (results / "loop_overhead.json", results / "loop_overhead_separate.json")
                if f.exists()]
    if overhead:
        sections.append(loop_overhead_section(overhead))
    for compared in sorted(results.glob("compare_*/compare.json")):
        if "smoke" not in compared.parent.name:
            sections.append(compare_section(json.loads(compared.read_text()), compared.parent.as_posix()))
    if (results / "data.json").exists():
        sections.append(data_section(json.loads((results / "data.json").read_text())))
    quality = results / "quality" / "quality.md"
    if quality.exists():
        sections.append(quality_section(quality))
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out} ({len(sections) - 1} sections)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
