"""Benchmarks (installed as relora_dist.benchmarks): throughput, memory, reset communication, kernels."""
