"""Public entry point: `two_source_attention`, choosing the Triton kernel or the torch reference.

The Triton module is imported lazily, on the first Triton call, so `import vlmdistill` never imports Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Literal

import torch
import torch.nn.functional as F

from .inputs import KERNEL_DTYPES, MaskSpec, Shapes, check_tensors, default_scale, normalize_masks
from .reference import attention_from_masks

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # compiled as they are; other head dims up to 128 are zero-padded to these
MAX_KERNEL_HEAD_DIM = 128


def triton_supports_head_dim(head_dim: int) -> bool:
    return 1 <= head_dim <= MAX_KERNEL_HEAD_DIM


def kernel_head_dim(head_dim: int) -> int:
    """The head dim the kernel runs at: the next of KERNEL_HEAD_DIMS. Zero columns change neither q.k nor the
    softmax, and the output's extra columns are 0."""
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def _triton_module():
    from . import triton_kv_share

    return triton_kv_share


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only through the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~0.1 ms: once per process, not per attention call


def triton_refusal(head_dim: int, dtype: torch.dtype | None, device: torch.device) -> str | None:
    """Why the Triton kernel cannot run this problem, or None where it can. The one policy every caller uses
    (the dispatcher and lingudistill's wrap-time check); `dtype=None` skips the dtype check (not known yet)."""
    if not triton_can_run(device):
        return (f"the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before import on the CPU); "
                f"got {device}")
    if not triton_installed():
        return "the Triton kernel needs the triton package, which is not installed (it has Linux wheels only)"
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"the Triton kernel supports float16, bfloat16 and float32 inputs; got {dtype}"
    if not triton_supports_head_dim(head_dim):
        return f"the Triton kernel supports head_dim up to {MAX_KERNEL_HEAD_DIM}; got {head_dim}"
    return None


def resolve_backend(backend: str, head_dim: int, dtype: torch.dtype | None, device: torch.device) -> str:
    """"auto": Triton on CUDA when the problem fits the kernel, torch otherwise. An explicit "triton" that
    cannot run raises instead of falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return "torch"
    refusal = triton_refusal(head_dim, dtype, device)
    if backend == "triton":
        if refusal:
            raise ValueError(refusal)
        return "triton"
    return "triton" if device.type == "cuda" and refusal is None else "torch"


def choose_backend(backend: str, shapes: Shapes, dtype: torch.dtype, device: torch.device) -> str:
    """`resolve_backend` for a checked problem."""
    return resolve_backend(backend, shapes.head_dim, dtype, device)


class _TwoSourceAttention(torch.autograd.Function):
    """Triton forward and backward. The lse output is not differentiable."""

    @staticmethod
    def forward(ctx, q, k_shared, v_shared, k_own, v_own, masks: MaskSpec, shapes: Shapes, scale: float):
        kernels = _triton_module()
        out, lse = kernels.two_source_forward(q, k_shared, v_shared, k_own, v_own, masks, shapes, scale)
        ctx.save_for_backward(q, k_shared, v_shared, k_own, v_own, out, lse)
        ctx.masks, ctx.shapes, ctx.scale = masks, shapes, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k_shared, v_shared, k_own, v_own, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], need[1] or need[2], need[3] or need[4])
        dq, shared, own = _triton_module().two_source_backward(
            q, k_shared, v_shared, k_own, v_own, out, lse, d_out, ctx.masks, ctx.shapes, ctx.scale, needs)
        dks, dvs = shared if shared is not None else (None, None)
        dko, dvo = own if own is not None else (None, None)
        return dq, dks, dvs, dko, dvo, None, None, None


def two_source_attention(q, k_shared, v_shared, k_own, v_own, *, pos_q, pos_shared, pos_own, seg_q=None,
                         seg_shared=None, seg_own=None, valid_shared=None, valid_own=None, scale=None,
                         backend: Backend = "auto"):
    """Attention of `q` over two key/value sources at once, as if they were one concatenated cache.

    Shapes (B batch, Hq query heads, Hkv kv heads with Hq % Hkv == 0, D head dim):
      q                    [B, Hq, Tq, D]   queries, RoPE applied
      k_shared, v_shared   [B, Hkv, Ts, D]  first source (in LinguDistill: the student's K/V at visual positions)
      k_own, v_own         [B, Hkv, Tt, D]  second source (the teacher's own K/V at text positions)
      pos_q / pos_shared / pos_own   [B, Tq] / [B, Ts] / [B, Tt] integer absolute positions
      seg_q / seg_shared / seg_own   same shapes, integer document ids of packed rows; all None = one document
                                     (a None beside given ones means document 0 for that source)
      valid_shared / valid_own       [B, Ts] / [B, Tt] bool key validity (padding = False); None = all valid
    Per-token tensors may also be [1, T] or [T] (broadcast over the batch). Ts or Tt may be 0.

    Query i reads key j iff pos_j <= pos_i and seg_j == seg_i and valid_j. Invalid key slots are never read (they
    may hold garbage, even NaN). K/V are never expanded for GQA: query head h reads kv head h // (Hq // Hkv), as in
    transformers' `repeat_kv`. Positions need not be sorted; sorted keys let the kernel skip more work.

    Returns `(out, lse)`: out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32 natural-log
    log-sum-exp of the scaled scores over the visible keys. A query that sees no key at all gets out = 0 and
    lse = -inf (never NaN).

    scale: multiplies q.k (default 1/sqrt(D)).
    backend: "auto" (Triton for CUDA tensors when dtype is fp16/bf16/fp32 and D <= 128, else torch; a D other than
      16/32/64/128 is zero-padded to the next of those, at the cost of a copy),
      "torch" (reference; any device; float64 inputs give float64 lse) or "triton" (raises if it cannot run).

    Gradients: both backends differentiate `out` with respect to q and all four K/V tensors (the Triton backend
    with its own backward kernels, computing only the gradients autograd asks for); lse carries no gradient.

    On a CPU, backend="triton" runs the kernel through the Triton interpreter, which needs TRITON_INTERPRET=1 in the
    environment before triton is first imported (importing vlmdistill does not import it; the first Triton call does).
    """
    shapes = check_tensors(q, k_shared, v_shared, k_own, v_own)
    masks = normalize_masks(shapes, q.device, pos_q=pos_q, pos_shared=pos_shared, pos_own=pos_own, seg_q=seg_q,
                            seg_shared=seg_shared, seg_own=seg_own, valid_shared=valid_shared,
                            valid_own=valid_own)
    scale = default_scale(shapes.head_dim, scale)
    if choose_backend(backend, shapes, q.dtype, q.device) == "torch":
        return attention_from_masks(q, k_shared, v_shared, k_own, v_own, masks, scale)
    kernel_masks = masks.for_kernel()
    tensors = (q, k_shared, v_shared, k_own, v_own)
    padded_dim = kernel_head_dim(shapes.head_dim)
    if padded_dim != shapes.head_dim:
        tensors = tuple(F.pad(t, (0, padded_dim - shapes.head_dim)) for t in tensors)
        shapes = dataclasses.replace(shapes, head_dim=padded_dim)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, lse = _TwoSourceAttention.apply(*tensors, kernel_masks, shapes, scale)
    else:
        out, lse = _triton_module().two_source_forward(*tensors, kernel_masks, shapes, scale)
    return out[..., :q.shape[-1]], lse
