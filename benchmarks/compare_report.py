"""relora-compare's outputs: the markdown table with the paper's numbers beside ours, the paper's orderings checked,
and the plots (validation curves, the LR sweeps, perplexity with its seed spread)."""

from __future__ import annotations

import contextlib
from pathlib import Path

# The paper's C4 perplexities (SPEC section 6): method table at 60M and 130M, ablation at 130M (None: diverged).
PAPER = {
    "full": {"60m": 33.81, "130m": 23.65}, "control": {"60m": 36.52, "130m": 27.30}, "lora": {"60m": 47.44, "130m": 34.17},
    "lora_ws": {"60m": 34.73, "130m": 25.46}, "relora": {"60m": 34.46, "130m": 25.04},
    "R": {"130m": 34.25}, "R+O": {"130m": None}, "R+J": {"130m": 34.29}, "R+O+J": {"130m": 29.77},
}
# (better, worse) pairs the paper's 130M numbers order; "R+O diverged" is checked separately.
PAPER_ORDERINGS = [("full", "relora"), ("relora", "lora_ws"), ("lora_ws", "control"), ("control", "lora"),
                   ("relora", "R+O+J"), ("R+O+J", "R"), ("R+O+J", "R+J"), ("lora_ws", "lora")]


def orderings(table: dict[str, dict]) -> list[dict]:
    """The paper's orderings on our mean perplexities (rows present only); a diverged row loses to any other."""
    def ppl(name):
        return None if table[name]["diverged"] else table[name]["val_ppl"]

    out = []
    for better, worse in PAPER_ORDERINGS:
        if better in table and worse in table:
            a, b = ppl(better), ppl(worse)
            within = None
            spreads = [table[n]["val_ppl_spread"] for n in (better, worse) if table[n]["val_ppl_spread"] is not None]
            if a is not None and b is not None and spreads:
                within = abs(a - b) <= max(spreads)  # a difference inside the seed spread is not resolved
            out.append({"paper": f"{better} < {worse}", "ours": None if a is None or b is None else f"{a:.2f} vs {b:.2f}",
                        "reproduced": a is not None and (b is None or a < b), "within_seed_spread": within})
    if "R+O" in table:
        r = table["R+O"]
        out.append({"paper": "R+O diverges", "ours": "diverged" if r["diverged"] else f"{r['val_ppl']:.2f}",
                    "reproduced": r["diverged"], "within_seed_spread": None})
    return out


def _dataset(flags: list[str]) -> str:
    dataset = flags[flags.index("--dataset") + 1] if "--dataset" in flags else "builtin:stdlib-docs"
    vocab = f", vocab {flags[flags.index('--vocab-size') + 1]}" if "--vocab-size" in flags else ""
    return f"`{dataset}`{vocab}"


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    s, m, table = report["settings"], report["machine"], report["rows"]
    device = m["gpu"] or f"CPU only ({m['cpu_count']} cores, {m['platform']})"
    lines = [
        f"Preset `{report['preset']}`: model {s['model']}, {s['steps']} updates x {s['global_batch']} x {s['seq_len']} = "
        f"{report['tokens_per_run'] / 1e6:.2f}M tokens every run, data {_dataset(s['data'])}, "
        f"r {s['rank']}, warm start {s['warm_start']}, merge every {s['merge_every']}. LR: the full-rank rate; low-rank "
        f"phases run at 2x (`all`: every parameter, the paper's recipe; `factors`: only the low-rank factors, "
        f"`--lora-lr-scope factors`). Seed {s['seeds'][0]} sweeps; the best LR is repeated on seeds "
        f"{', '.join(map(str, s['seeds'][1:])) or '-'} for the top {s['top']} rows (ppl: mean, spread = max - min). "
        f"Measured on {device}, torch {m['torch']}, one thread a run; bytes and tokens/s per rank from relora-bench on "
        f"2 DDP ranks.",
        "",
        "| row | recipe | LRs tried | best LR | bracketed | seeds | val ppl | spread | trainable params | Adam state MiB | "
        "peak RSS GiB | tokens/s (1 proc) | tokens/s/rank (2 DDP) | MB sent/update (2 DDP) | wall s | paper 60M | paper 130M |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(table.items(), key=lambda kv: (kv[1]["val_ppl"] is None, kv[1]["val_ppl"] or 0.0)):
        paper = PAPER.get(name, {})

        def paper_ppl(size):
            if size not in paper:
                return "-"
            return "diverged" if paper[size] is None else f"{paper[size]:.2f}"

        ppl = "diverged" if r["diverged"] else _num(r["val_ppl"], ".2f")
        lines.append(
            f"| {name} | {r['recipe'] or '-'} "
            f"| {', '.join(f'{lr:g}' for lr in r['lrs'])} | {r['best_lr']:g} | {'yes' if r['bracketed'] else 'no'} "
            f"| {len(r['seeds'])} | {ppl} | {_num(r['val_ppl_spread'], '.2f')} "
            f"| {_num(r['trainable_parameters'] and r['trainable_parameters'] / 1e6, '.2f')}M "
            f"| {_num(r['optimizer_state_bytes'] and r['optimizer_state_bytes'] / 2**20, '.1f')} "
            f"| {_num(r['peak_memory_gib'], '.2f')} | {_num(r['tokens_per_s'], '.0f')} "
            f"| {_num(r['tokens_per_s_per_rank_2ranks'], '.0f')} "
            f"| {_num(r['bytes_per_update_2ranks'] and r['bytes_per_update_2ranks'] / 1e6, '.2f')} "
            f"| {_num(r['wall_s'], '.3g')} | {paper_ppl('60m')} | {paper_ppl('130m')} |")
    lines += ["", "| the paper's ordering | ours (ppl) | reproduced | inside the seed spread |", "|---|---|---|---|"]
    lines += [f"| {c['paper']} | {c['ours']} | {'yes' if c['reproduced'] else 'no'} | "
              f"{'-' if c['within_seed_spread'] is None else ('yes' if c['within_seed_spread'] else 'no')} |"
              for c in report["orderings"]]
    if report.get("spectrum"):
        lines += ["", "| update W_final - W_warm_start | singular values in [0.1, 1] | effective rank (mean) | numerical rank (mean) |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {100 * v['fraction_in_range']:.1f}% | {v['effective_rank']:.1f} | {v['numerical_rank']:.1f} |"
                  for k, v in report["spectrum"].items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _figure(path: Path, *, xlabel: str, ylabel: str | None = None, size=(8, 5), legend: bool = True):
    """An Agg figure's axes; labelled, laid out and saved to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        if legend:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_val_curves(best: dict[str, dict], path: Path) -> None:
    """Validation loss against training tokens, each row at its best LR (sweep seed)."""
    with _figure(path, xlabel="training tokens (M)", ylabel="validation loss") as ax:
        for name, r in sorted(best.items()):
            if not r["diverged"] and r.get("curve"):
                tokens, losses = zip(*r["curve"])
                ax.plot([t / 1e6 for t in tokens], losses, label=f"{name} (lr {r['lr']:g})",
                        linestyle="--" if "@" in name or "+" in name or name == "R" else "-")


def plot_lr_sweep(runs: list[dict], seed: int, path: Path) -> None:
    """Final validation loss against the full-rank LR, one line per row (sweep seed; diverged runs left out): a
    row's best LR is bracketed when its line turns up on both sides."""
    by_row: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r["seed"] == seed and not r["diverged"]:
            by_row.setdefault(r["row"], []).append((r["lr"], r["val_loss"]))
    with _figure(path, xlabel="learning rate (full-rank; low-rank phases 2x)", ylabel="final validation loss") as ax:
        for name, points in sorted(by_row.items()):
            lrs, losses = zip(*sorted(points))
            ax.plot(lrs, losses, marker="o", label=name)
        ax.set_xscale("log")


def plot_perplexities(table: dict[str, dict], path: Path) -> None:
    """Validation perplexity per row at its best LR: the mean over its seeds, the bar spanning min to max."""
    named = sorted(((n, r) for n, r in table.items() if r["val_ppl"] is not None), key=lambda kv: kv[1]["val_ppl"])
    with _figure(path, xlabel="validation perplexity at the best LR (mean; bar: min to max over seeds)",
                 size=(8, 0.4 * len(named) + 1.5), legend=False) as ax:
        for i, (name, r) in enumerate(named):
            low, high = r["val_ppl_range"]
            ax.errorbar(r["val_ppl"], i, xerr=[[r["val_ppl"] - low], [high - r["val_ppl"]]], fmt="o", capsize=3)
        ax.set_yticks(range(len(named)), [f"{n} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})"
                                          for n, r in named])
        ax.invert_yaxis()
