"""Distillation methods shipped with vlmdistill, one folder each."""
