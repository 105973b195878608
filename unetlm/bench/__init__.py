"""Benchmarks: measured speed of training and generation (not timed tests)."""
