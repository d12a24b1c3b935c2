"""Performance accounting (exact FLOPs, bytes, traffic); the harness and the performance model build on it."""

from .accounting import FULL_RANK, CostTraits, ModelCounts, Precision, gradient_bytes_per_update, static_bytes
from .hardware import PROFILES, Hardware, measure_cpu_profile, peak_flops_for
from .model import (
    ActivationCoefficients,
    Efficiency,
    Prediction,
    Workload,
    activation_bytes_per_token,
    fit_efficiency,
    max_micro_batch,
    memory_bytes,
    paper_table4,
    predict,
    warm_start_adjusted,
)

__all__ = ["CostTraits", "FULL_RANK", "ModelCounts", "Precision", "static_bytes", "gradient_bytes_per_update",
           "Hardware", "PROFILES", "measure_cpu_profile", "peak_flops_for",
           "ActivationCoefficients", "Efficiency", "Prediction", "Workload", "activation_bytes_per_token",
           "fit_efficiency", "max_micro_batch", "memory_bytes", "paper_table4", "predict", "warm_start_adjusted"]
