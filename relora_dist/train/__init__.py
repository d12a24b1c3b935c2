"""Training run configuration, loop, checkpoints and metrics."""
