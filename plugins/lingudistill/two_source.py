"""The teacher's attention over two K/V sources: the student's at shared positions, its own elsewhere.

`two_source_attention` is the text-only-query form (queries only where the teacher runs), dispatched to the fused
Triton kernel of `vlmdistill.kernels` or to masked SDPA here. `replaced_attention` is the full-length reference:
the teacher's K/V with the student's written over the shared positions, then ordinary causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_kernel():
    """`vlmdistill.kernels.two_source_attention`, or None where the kernels package is not installed."""
    try:
        from vlmdistill.kernels import two_source_attention
    except ImportError:
        return None
    return two_source_attention


def _masked_sdpa(q, k, v, allowed, scale):
    """SDPA with a boolean `[B, Tq, Tk]` mask; a query that sees no key gets 0 (not NaN)."""
    empty = ~allowed.any(-1)
    allowed = allowed | empty[..., None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty[:, None, :, None], 0.0)


def _visible(pos_q, pos_k, valid_k, seg_q=None, seg_k=None):
    allowed = (pos_k[:, None, :] <= pos_q[:, :, None]) & valid_k[:, None, :]
    if seg_q is not None:
        allowed &= seg_k[:, None, :] == seg_q[:, :, None]
    return allowed


def torch_two_source_attention(q, k_shared, v_shared, k_own, v_own, *, pos_q, pos_shared, pos_own, seg_q=None,
                               seg_shared=None, seg_own=None, valid_shared, valid_own, scale):
    """Query i reads key j iff pos_j <= pos_i, same document, and the key slot is valid. q `[B, Hq, Tq, D]`,
    K/V `[B, Hkv, T, D]` (GQA without expansion); returns `[B, Hq, Tq, D]`."""
    k = torch.cat([k_shared, k_own], dim=2)
    v = torch.cat([v_shared, v_own], dim=2)
    seg_k = torch.cat([seg_shared, seg_own], dim=1) if seg_q is not None else None
    allowed = _visible(pos_q, torch.cat([pos_shared, pos_own], 1), torch.cat([valid_shared, valid_own], 1),
                       seg_q, seg_k)
    return _masked_sdpa(q, k, v, allowed, scale)


def _kernel_fits(q: torch.Tensor) -> bool:
    from vlmdistill.kernels import KERNEL_HEAD_DIMS

    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] in KERNEL_HEAD_DIMS


def two_source_attention(q, k_shared, v_shared, k_own, v_own, *, kernel: str, scale: float, **meta):
    """'triton': the fused kernel; 'auto': the fused kernel on CUDA when dtype and head_dim fit, masked SDPA
    otherwise; 'torch': masked SDPA."""
    fused = fused_kernel() if kernel != "torch" else None
    if kernel == "triton" and fused is None:
        raise RuntimeError("kernel='triton' needs vlmdistill.kernels, which is not installed")
    if fused is not None and (kernel == "triton" or _kernel_fits(q)):
        out, _ = fused(q, k_shared, v_shared, k_own, v_own, scale=scale, backend="triton", **meta)
        return out
    return torch_two_source_attention(q, k_shared, v_shared, k_own, v_own, scale=scale, **meta)


def scatter_shared(own: torch.Tensor, shared: torch.Tensor, index: torch.Tensor, valid: torch.Tensor):
    """`own` `[B, H, T, D]` with `shared` `[B, H, Ts, D]` written at sequence positions `index` `[B, Ts]`."""
    b, h, t, d = own.shape
    target = torch.where(valid, index, torch.full_like(index, t))  # padding slots land in a spare column
    spread = own.new_zeros(b, h, t + 1, d).scatter(2, target[:, None, :, None].expand(b, h, -1, d),
                                                   shared.to(own.dtype))
    is_shared = torch.zeros(b, t + 1, dtype=torch.bool, device=own.device).scatter(1, target, valid)
    return torch.where(is_shared[:, None, :t, None], spread[:, :, :t], own)


def replaced_attention(q, k, v, k_shared, v_shared, *, shared_index, shared_valid, positions, valid, segments,
                       scale):
    """Full-length reference: every query over the teacher's K/V with the student's at the shared positions."""
    k = scatter_shared(k, k_shared, shared_index, shared_valid)
    v = scatter_shared(v, v_shared, shared_index, shared_valid)
    allowed = _visible(positions, positions, valid, segments, segments)
    return _masked_sdpa(q, k, v, allowed, scale)
