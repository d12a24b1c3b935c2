"""Every console script's entry point, one module each: relora-train and relora-export (`train.py`), relora-data,
relora-perfmodel, relora-spectrum, relora-plot, and relora-bench / relora-compare / relora-memprof (the
benchmarks' own mains, `bench.py`). The library below never imports this package."""
