"""Attention kernels. `two_source_attention` reads two key/value sources (e.g. a student's shared K/V and a
teacher's own K/V) in one pass; `two_source_attention_reference` is the plain-torch version it is tested
against. Triton is imported only when the Triton backend is first used."""

from .dispatch import (BACKENDS, KERNEL_HEAD_DIMS, MAX_KERNEL_HEAD_DIM, choose_backend, resolve_backend,
                       triton_can_run, triton_refusal, triton_supports_head_dim, two_source_attention)
from .reference import two_source_attention_reference

__all__ = ["two_source_attention", "two_source_attention_reference", "choose_backend", "resolve_backend",
           "triton_can_run", "triton_refusal", "triton_supports_head_dim", "BACKENDS", "KERNEL_HEAD_DIMS",
           "MAX_KERNEL_HEAD_DIM"]
