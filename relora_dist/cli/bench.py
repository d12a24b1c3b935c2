"""relora-bench, relora-compare and relora-memprof: the harness's entry points. Each benchmark keeps its own
arguments and main beside its measurement (`relora_dist.benchmarks`); they are imported only when called, so
`relora-train` never loads the harness."""

from __future__ import annotations


def bench_main(argv=None) -> int:
    from ..benchmarks.throughput import main

    return main(argv)


def compare_main(argv=None) -> int:
    from ..benchmarks.compare import main

    return main(argv)


def memprof_main(argv=None) -> int:
    from ..benchmarks.memory import main

    return main(argv)
