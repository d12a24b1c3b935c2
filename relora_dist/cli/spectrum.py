"""relora-spectrum: singular values of the update between two checkpoints of one model (paper Figure 5)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..analysis.spectrum import plot_spectra, pooled_stats, update_spectra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="relora-spectrum", description=__doc__)
    parser.add_argument("before", help="earlier checkpoint: relora-train step dir or HF safetensors dir (e.g. the warm start)")
    parser.add_argument("after", help="later checkpoint of the same model")
    parser.add_argument("--label", default="update", help="name in the plot and the JSON (e.g. relora, lora, full)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--low", type=float, default=0.1)
    parser.add_argument("--high", type=float, default=1.0)
    args = parser.parse_args(argv)
    from ..export import merged_weights

    try:
        spectra = update_spectra(merged_weights(args.after), merged_weights(args.before))
    except ValueError as e:
        print(f"relora-spectrum: error: {e}", file=sys.stderr)
        return 2
    stats = pooled_stats(spectra, low=args.low, high=args.high)
    print(f"{args.label}: singular values of W_after - W_before over {stats['all']['matrices']} matrices")
    print(f"{'projection':>10} {'values':>8} {'in [%g, %g]' % (args.low, args.high):>12} {'eff. rank':>10} {'num. rank':>10} {'largest':>10}")
    for kind, s in stats.items():
        print(f"{kind:>10} {s['count']:8d} {100 * s['fraction_in_range']:11.1f}% {s['effective_rank']:10.1f} "
              f"{s['numerical_rank']:10.1f} {s['largest']:10.4f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"label": args.label, "before": args.before, "after": args.after,
                                                        "stats": stats}, indent=1))
        plot_spectra({args.label: spectra}, out.with_suffix(".png"), low=args.low, high=args.high)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
