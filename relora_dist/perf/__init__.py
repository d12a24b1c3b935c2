"""Performance accounting (exact FLOPs, bytes, traffic); the harness and the performance model build on it."""

from .accounting import ModelCounts, Precision, gradient_bytes_per_update, static_bytes

__all__ = ["ModelCounts", "Precision", "static_bytes", "gradient_bytes_per_update"]
