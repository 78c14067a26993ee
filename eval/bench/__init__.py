"""Benchmark scripts (GPU timings with a CPU smoke path)."""
