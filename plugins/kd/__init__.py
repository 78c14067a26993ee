"""Generic logit and feature distillation."""
