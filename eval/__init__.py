"""Evaluation harnesses, benchmarks and experiments of vlmdistill."""
