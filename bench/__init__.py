"""Benchmarks of the quantizer's kernels and training step (run with `pytest bench --benchmark-only`)."""
