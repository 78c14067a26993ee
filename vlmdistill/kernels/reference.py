"""Plain-torch two-source attention: the CPU backend and the test oracle of the Triton kernel.

It concatenates the two key/value sources and builds the full boolean mask, which the fused kernel exists to
avoid; clarity matters more than memory here. Gradients come from autograd, for every input.
"""

from __future__ import annotations

import torch

from .inputs import MaskSpec, check_tensors, default_scale, normalize_masks


def visibility_mask(masks: MaskSpec) -> torch.Tensor:
    """`[B, Tq, Ts + Tt]` bool: which key (shared keys first, then own keys) each query may read."""
    pos_k = torch.cat([masks.pos_shared, masks.pos_own], dim=1)
    allowed = pos_k[:, None, :] <= masks.pos_q[:, :, None]
    if masks.has_segments:
        seg_k = torch.cat([masks.seg_shared, masks.seg_own], dim=1)
        allowed &= seg_k[:, None, :] == masks.seg_q[:, :, None]
    valid = [_valid_or_ones(masks.valid_shared, masks.pos_shared), _valid_or_ones(masks.valid_own, masks.pos_own)]
    allowed &= torch.cat(valid, dim=1)[:, None, :]
    return allowed


def attention_from_mask(q, k, v, allowed, scale):
    """Masked softmax attention with GQA by reshaping (no K/V expansion).

    q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]`, allowed `[B, Tq, Tk]`. Computes in float64 for float64 inputs,
    float32 otherwise. Rows without a visible key get output 0 and lse -inf (no NaN, also in backward).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    lse_dtype = compute
    if k.shape[2] == 0:
        return torch.zeros_like(q), torch.full((b, hq, tq), float("-inf"), dtype=lse_dtype, device=q.device)
    qg = q.to(compute).reshape(b, hkv, hq // hkv, tq, d)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.to(compute)) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    # Shift by 0 on empty rows: exp(-inf - 0) = 0 keeps both the value and its gradient finite.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.to(compute)).reshape(b, hq, tq, d)
    lse = (denom.detach().log() + row_max).reshape(b, hq, tq)
    return out.to(q.dtype), lse.to(lse_dtype)


def two_source_attention_reference(q, k_shared, v_shared, k_own, v_own, *, pos_q, pos_shared, pos_own,
                                   seg_q=None, seg_shared=None, seg_own=None, valid_shared=None,
                                   valid_own=None, scale=None):
    """Reference implementation of `two_source_attention` (same arguments, no `backend`).

    Returns `(out, lse)`: out has q's dtype; lse is float32 (float64 for float64 inputs) and not differentiable.
    """
    shapes = check_tensors(q, k_shared, v_shared, k_own, v_own)
    masks = normalize_masks(shapes, q.device, pos_q=pos_q, pos_shared=pos_shared, pos_own=pos_own, seg_q=seg_q,
                            seg_shared=seg_shared, seg_own=seg_own, valid_shared=valid_shared,
                            valid_own=valid_own)
    return attention_from_masks(q, k_shared, v_shared, k_own, v_own, masks, default_scale(shapes.head_dim, scale))


def attention_from_masks(q, k_shared, v_shared, k_own, v_own, masks: MaskSpec, scale: float):
    """Reference on already-normalised metadata (used by the dispatcher)."""
    k = torch.cat([k_shared, k_own], dim=2)
    v = torch.cat([v_shared, v_own], dim=2)
    # Padded slots may hold garbage (even NaN); 0 * NaN would leak it through the probabilities' zeros.
    valid = torch.cat([_valid_or_ones(masks.valid_shared, masks.pos_shared),
                       _valid_or_ones(masks.valid_own, masks.pos_own)], dim=1)[:, None, :, None]
    k = torch.where(valid, k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device))
    return attention_from_mask(q, k, v, visibility_mask(masks), scale)


def _valid_or_ones(valid, pos):
    return valid if valid is not None else torch.ones_like(pos, dtype=torch.bool)
