"""Helpers for tests and benchmarks: real local servers to run batch-gateway against."""
