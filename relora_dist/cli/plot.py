"""relora-plot: the loss, validation-loss and learning-rate curves of one or more runs on one PNG, with each run's
method events (warm-start switch, merges, ...) marked where they happened.

    relora-plot runs/full runs/relora --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_run(run_dir: Path) -> tuple[str, list[dict]]:
    """(label, metrics records) of a run directory; the label is the directory name with its method."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl (not a relora-train run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON line") from None
    if not records:
        raise ValueError(f"{path} is empty")
    summary = run_dir / "summary.json"
    method = json.loads(summary.read_text()).get("method") if summary.is_file() else None
    return (f"{run_dir.name} ({method})" if method else run_dir.name), records


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {}  # event name -> line style, one legend entry each
    for (label, records), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(runs)):
        steps = [r["step"] for r in records]
        loss_ax.plot(steps, [r["loss"] for r in records], color=color, alpha=0.5, lw=1, label=f"{label} train")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            loss_ax.plot(*zip(*val), "o-", color=color, ms=3, label=f"{label} val")
        lr_ax.plot(steps, [r["lr"] for r in records], color=color, label=label)
        for r in records:
            for name in r.get("events", []):
                style = styles.setdefault(name, (":", "--", "-.")[len(styles) % 3])
                for ax in (loss_ax, lr_ax):
                    ax.axvline(r["step"], color=color, ls=style, lw=0.8, alpha=0.6)
    for name, style in styles.items():
        loss_ax.plot([], [], color="gray", ls=style, label=f"event: {name}")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=7)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("update")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="relora-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (relora-train --out)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.runs]
    except ValueError as e:
        print(f"relora-plot: error: {e}", file=sys.stderr)
        return 2
    plot_runs(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
