"""The metric columns of a training run and where they go: one component for the trainer and the benchmarks.

`columns` computes the shared columns (throughput, MFU/HFU, memory); `reporters` sends each update's record to
TensorBoard and W&B (`--report-to`); `plot` draws runs' curves (`relora-plot`).
"""

from .columns import Utilization, device_peak_flops, memory_fields, scalar_tags, throughput_fields
from .reporters import REPORTERS, build_reporters, check_report_to, reporter_names

__all__ = ["Utilization", "device_peak_flops", "memory_fields", "scalar_tags", "throughput_fields", "REPORTERS", "build_reporters",
           "check_report_to", "reporter_names"]
