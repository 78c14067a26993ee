"""Validation and normalisation of the inputs of two-source attention.

Both backends (torch reference and Triton) take the same arguments; this module checks them once and turns the
per-token metadata (positions, segment ids, key validity) into `[B, T]` tensors, so the backends only deal with
one layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class MaskSpec:
    """Per-token metadata deciding which keys a query may read.

    mask(q, k) = pos_k <= pos_q  and  seg_k == seg_q  and  valid_k.
    All tensors are `[B, T]` of the matching source. `seg_*` are all None (one segment per row) or all set;
    `valid_*` is None when every key of that source is valid.
    """

    pos_q: torch.Tensor
    pos_shared: torch.Tensor
    pos_own: torch.Tensor
    seg_q: torch.Tensor | None
    seg_shared: torch.Tensor | None
    seg_own: torch.Tensor | None
    valid_shared: torch.Tensor | None
    valid_own: torch.Tensor | None

    @property
    def has_segments(self) -> bool:
        return self.seg_q is not None

    def for_kernel(self) -> "MaskSpec":
        """Contiguous int32 positions/segments and bool validity: the layout the Triton kernels index (no copy
        when the tensors already have it)."""

        def ints(t):
            return None if t is None else t.to(torch.int32).contiguous()

        def flags(t):
            return None if t is None else t.to(torch.bool).contiguous()

        return MaskSpec(ints(self.pos_q), ints(self.pos_shared), ints(self.pos_own), ints(self.seg_q),
                        ints(self.seg_shared), ints(self.seg_own), flags(self.valid_shared), flags(self.valid_own))


@dataclass(frozen=True)
class Shapes:
    batch: int
    q_heads: int
    kv_heads: int
    n_queries: int
    n_shared: int
    n_own: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def check_tensors(q, k_shared, v_shared, k_own, v_own) -> Shapes:
    """Check the five attention tensors agree; return the problem sizes."""
    named = {"q": q, "k_shared": k_shared, "v_shared": v_shared, "k_own": k_own, "v_own": v_own}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, T, D]; got {getattr(t, 'shape', type(t))}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must share one dtype; got { {n: t.dtype for n, t in named.items()} }")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"q, k and v must be on one device; got {sorted(map(str, devices))}")
    if k_shared.shape != v_shared.shape:
        raise ValueError(f"k_shared {tuple(k_shared.shape)} and v_shared {tuple(v_shared.shape)} differ")
    if k_own.shape != v_own.shape:
        raise ValueError(f"k_own {tuple(k_own.shape)} and v_own {tuple(v_own.shape)} differ")
    b, hq, tq, d = q.shape
    for name, t in (("k_shared", k_shared), ("k_own", k_own)):
        if t.shape[0] != b or t.shape[3] != d:
            raise ValueError(f"{name} {tuple(t.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if k_shared.shape[1] != k_own.shape[1]:
        raise ValueError(f"shared and own K/V have different kv-head counts: {k_shared.shape[1]} vs {k_own.shape[1]}")
    hkv = k_shared.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    return Shapes(b, hq, hkv, tq, k_shared.shape[2], k_own.shape[2], d)


def _per_token(name: str, t, batch: int, length: int, device, *, kind: str) -> torch.Tensor | None:
    """Accept `[B, T]`, `[1, T]` or `[T]`; return `[B, T]` (a broadcast view when the batch dim was 1)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor; got {type(t)}")
    if kind == "valid" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor; got {t.dtype}")
    if kind != "valid" and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor; got {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != length or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be [B, T] = [{batch}, {length}] (or [1, T] / [T]); got {tuple(t.shape)}")
    return t.to(device).expand(batch, length)


def normalize_masks(shapes: Shapes, device, *, pos_q, pos_shared, pos_own, seg_q=None, seg_shared=None,
                    seg_own=None, valid_shared=None, valid_own=None) -> MaskSpec:
    """Check per-token metadata against the problem sizes. A missing segment tensor means segment 0 for that
    source when any other source has segments, so mixing given and omitted segment ids is well defined."""
    b = shapes.batch
    if pos_q is None or pos_shared is None or pos_own is None:
        raise ValueError("pos_q, pos_shared and pos_own are required (absolute positions decide causality)")
    positions = [_per_token(n, t, b, length, device, kind="pos") for n, t, length in (
        ("pos_q", pos_q, shapes.n_queries), ("pos_shared", pos_shared, shapes.n_shared),
        ("pos_own", pos_own, shapes.n_own))]
    segments = [_per_token(n, t, b, length, device, kind="seg") for n, t, length in (
        ("seg_q", seg_q, shapes.n_queries), ("seg_shared", seg_shared, shapes.n_shared),
        ("seg_own", seg_own, shapes.n_own))]
    if any(s is not None for s in segments):
        lengths = (shapes.n_queries, shapes.n_shared, shapes.n_own)
        segments = [s if s is not None else torch.zeros(b, n, dtype=torch.int64, device=device)
                    for s, n in zip(segments, lengths)]
    valid_s = _per_token("valid_shared", valid_shared, b, shapes.n_shared, device, kind="valid")
    valid_o = _per_token("valid_own", valid_own, b, shapes.n_own, device, kind="valid")
    return MaskSpec(*positions, *segments, valid_s, valid_o)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
