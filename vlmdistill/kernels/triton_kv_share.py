"""Triton kernels: attention of one set of queries over two key/value sources in one online-softmax pass.

Layout of the work (see README.md in this folder for the design):
* a program owns BLOCK_M *packed rows* of one (batch, kv head): row r is query token r // G of query head
  kv_head * G + r % G, so the G query heads sharing a K/V head read every K/V tile once;
* for each source (shared, then own) a first pass over key metadata only finds the range of key tiles that are not
  skipped (a tile is skipped when, from its min/max position and segment and the query tile's, nothing in it can
  be visible); the main loop walks that range with unconditional (pipelinable) K/V loads, and leaves out the
  per-element mask on tiles that are fully visible;
* softmax is accumulated in base 2 with fp32 state; the output is normalised once at the end.

Import this module only through the dispatcher. To run the kernels on a CPU, `TRITON_INTERPRET=1` must be set
before triton itself is first imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .inputs import MaskSpec, Shapes

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
_FAR = tl.constexpr(1 << 30)  # beyond any position or segment id: neutral element of the tile min/max
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_forward_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    if INTERPRETING:
        # The interpreter pays per program and per loop step, not per element: big tiles are cheapest.
        return KernelConfig(block_m=128, block_n=64)
    if dtype == torch.float32:  # 4-byte tiles: halve them to stay within registers and shared memory
        return KernelConfig(block_m=64, block_n=32, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    if head_dim <= 64:
        return KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def default_backward_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    if INTERPRETING:
        return KernelConfig(block_m=64, block_n=64)
    if dtype == torch.float32:
        return KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    return KernelConfig(block_m=64, block_n=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def forward_config_candidates(head_dim: int) -> list[KernelConfig]:
    """Configurations a benchmark may sweep on a GPU (the defaults are untuned guesses until then)."""
    return [KernelConfig(bm, bn, w, s) for bm, bn, w, s in (
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 2))
        if not (head_dim == 128 and bm * bn >= 256 * 64 and w == 4)]


# --------------------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_key_meta(Pos, Seg, Valid, offs_n, n_keys, HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr):
    """Positions, segments and visibility of one key tile; keys past the end are invisible."""
    in_range = offs_n < n_keys
    k_pos = tl.load(Pos + offs_n, mask=in_range, other=0)
    if HAS_SEG:
        k_seg = tl.load(Seg + offs_n, mask=in_range, other=0)
    else:
        k_seg = tl.zeros_like(k_pos)
    k_visible = in_range
    if HAS_VALID:
        k_visible = k_visible & (tl.load(Valid + offs_n, mask=in_range, other=0) != 0)
    return k_pos, k_seg, k_visible


@triton.jit
def _load_query_meta(PosQ, SegQ, t, row_ok, HAS_SEG: tl.constexpr):
    q_pos = tl.load(PosQ + t, mask=row_ok, other=0)
    if HAS_SEG:
        q_seg = tl.load(SegQ + t, mask=row_ok, other=0)
    else:
        q_seg = tl.zeros_like(q_pos)
    return q_pos, q_seg


@triton.jit
def _extent(pos, seg, ok):
    """Min/max position and segment over the entries of a tile that count, and how many count."""
    pos_lo = tl.min(tl.where(ok, pos, _FAR), 0)
    pos_hi = tl.max(tl.where(ok, pos, -_FAR), 0)
    seg_lo = tl.min(tl.where(ok, seg, _FAR), 0)
    seg_hi = tl.max(tl.where(ok, seg, -_FAR), 0)
    return pos_lo, pos_hi, seg_lo, seg_hi, tl.sum(ok.to(tl.int32), 0)


@triton.jit
def _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
              BLOCK_N: tl.constexpr):
    """(skip, full) for a query tile x key tile, from their extents (k_count = visible keys in the tile).
    `skip` is conservative (True only when nothing is visible); `full` means every real query row sees every key,
    so the per-element mask can be left out."""
    skip = (k_count == 0) | (k_pos_lo > q_pos_hi) | (k_seg_lo > q_seg_hi) | (k_seg_hi < q_seg_lo)
    one_segment = (k_seg_lo == k_seg_hi) & (q_seg_lo == q_seg_hi) & (k_seg_lo == q_seg_lo)
    full = (k_count == BLOCK_N) & (k_pos_hi <= q_pos_lo) & one_segment
    return skip, full


@triton.jit
def _key_tile_range(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, Pos, Seg, Valid, n_keys, BLOCK_N: tl.constexpr,
                    HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr):
    """[first, last) key tiles that are not skipped for this query tile, from a pass over key metadata only.
    Keeping K/V loads out of conditionals lets the compiler pipeline them; with keys in position order (as in a
    cache) the tiles outside the range are exactly the skipped ones."""
    n_tiles = (n_keys + BLOCK_N - 1) // BLOCK_N
    first = n_tiles
    last = 0
    for tile in range(0, n_tiles):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_pos, k_seg, k_visible = _load_key_meta(Pos, Seg, Valid, offs_n, n_keys, HAS_SEG, HAS_VALID)
        k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count = _extent(k_pos, k_seg, k_visible)
        skip, _ = _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
                            BLOCK_N)
        first = tl.where(skip, first, tl.minimum(first, tile))
        last = tl.where(skip, last, tile + 1)
    return first, last


@triton.jit
def _query_tile_range(k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count, PosQ, SegQ, n_queries,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr):
    """[first, last) packed query tiles that can see this key tile (the backward's counterpart of
    `_key_tile_range`)."""
    n_rows = n_queries * GROUP
    n_tiles = (n_rows + BLOCK_M - 1) // BLOCK_M
    first = n_tiles
    last = 0
    for tile in range(0, n_tiles):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q_pos, q_seg = _load_query_meta(PosQ, SegQ, rows // GROUP, row_ok, HAS_SEG)
        q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, _ = _extent(q_pos, q_seg, row_ok)
        skip, _ = _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
                            BLOCK_N)
        first = tl.where(skip, first, tl.minimum(first, tile))
        last = tl.where(skip, last, tile + 1)
    return first, last


@triton.jit
def _element_mask(q_pos, q_seg, k_pos, k_seg, k_visible, HAS_SEG: tl.constexpr):
    allowed = k_visible[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if HAS_SEG:
        allowed = allowed & (k_seg[None, :] == q_seg[:, None])
    return allowed


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend_one_source(acc, m_i, l_i, q, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
                       K, V, stride_kt, stride_kd, stride_vt, stride_vd, Pos, Seg, Valid, n_keys, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr,
                       HAS_VALID: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one key/value source into the running (acc, max, sum) of a query tile. Also returns how many key
    tiles were skipped, taken whole and masked."""
    offs_d = tl.arange(0, HEAD_DIM)
    first, last = _key_tile_range(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, Pos, Seg, Valid, n_keys, BLOCK_N,
                                  HAS_SEG, HAS_VALID)
    n_full = 0
    n_masked = 0
    for tile in range(first, last):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_pos, k_seg, k_visible = _load_key_meta(Pos, Seg, Valid, offs_n, n_keys, HAS_SEG, HAS_VALID)
        # Invisible keys load as 0: garbage (even NaN) in padded slots never reaches the output.
        k_t = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=k_visible[None, :],
                      other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=k_visible[:, None],
                    other=0.0)
        if CAST_FP32:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count = _extent(k_pos, k_seg, k_visible)
        _, full = _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
                            BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if full:
            n_full += 1
        else:
            n_masked += 1
            s = tl.where(_element_mask(q_pos, q_seg, k_pos, k_seg, k_visible, HAS_SEG), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep max -inf: shift them by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    n_skipped = (n_keys + BLOCK_N - 1) // BLOCK_N - n_full - n_masked
    return acc, m_i, l_i, n_skipped, n_full, n_masked


@triton.jit
def _two_source_fwd_kernel(
        Q, Ks, Vs, Ko, Vo, Out, Lse, TileStats,
        PosQ, PosS, PosO, SegQ, SegS, SegO, ValidS, ValidO,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_ksb, stride_ksh, stride_kst, stride_ksd,
        stride_vsb, stride_vsh, stride_vst, stride_vsd,
        stride_kob, stride_koh, stride_kot, stride_kod,
        stride_vob, stride_voh, stride_vot, stride_vod,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_lb, stride_lh, stride_lt,
        n_kv_heads, n_queries, n_shared, n_own, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_VALID_SHARED: tl.constexpr, HAS_VALID_OWN: tl.constexpr,
        CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    h_kv = pid_bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries * GROUP
    t = rows // GROUP
    h_q = h_kv * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + b * stride_qb + h_q[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
    q_pos, q_seg = _load_query_meta(PosQ + b * n_queries, SegQ + b * n_queries, t, row_ok, HAS_SEG)
    q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, _ = _extent(q_pos, q_seg, row_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    acc, m_i, l_i, s_skipped, s_full, s_masked = _attend_one_source(
        acc, m_i, l_i, q, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
        Ks + b * stride_ksb + h_kv * stride_ksh, Vs + b * stride_vsb + h_kv * stride_vsh,
        stride_kst, stride_ksd, stride_vst, stride_vsd,
        PosS + b * n_shared, SegS + b * n_shared, ValidS + b * n_shared, n_shared, qk_scale,
        HEAD_DIM, BLOCK_N, HAS_SEG, HAS_VALID_SHARED, CAST_FP32, DOT_PRECISION)
    acc, m_i, l_i, o_skipped, o_full, o_masked = _attend_one_source(
        acc, m_i, l_i, q, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
        Ko + b * stride_kob + h_kv * stride_koh, Vo + b * stride_vob + h_kv * stride_voh,
        stride_kot, stride_kod, stride_vot, stride_vod,
        PosO + b * n_own, SegO + b * n_own, ValidO + b * n_own, n_own, qk_scale,
        HEAD_DIM, BLOCK_N, HAS_SEG, HAS_VALID_OWN, CAST_FP32, DOT_PRECISION)

    # A row with no visible key anywhere has l_i == 0: it gets output 0 and lse -inf.
    seen = l_i > 0.0
    l_div = tl.where(seen, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_div)) * _LN2, float("-inf"))
    tl.store(Out + b * stride_ob + h_q[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + b * stride_lb + h_q * stride_lh + t * stride_lt, lse, mask=row_ok)

    if COUNT_TILES:
        tl.atomic_add(TileStats + 0, s_skipped)
        tl.atomic_add(TileStats + 1, s_full)
        tl.atomic_add(TileStats + 2, s_masked)
        tl.atomic_add(TileStats + 3, o_skipped)
        tl.atomic_add(TileStats + 4, o_full)
        tl.atomic_add(TileStats + 5, o_masked)


# --------------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2 recurrences: P from the saved lse, dS = P * (dP - rowsum(dO * O)))
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _two_source_bwd_dkv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV,
        PosQ, PosK, SegQ, SegK, ValidK,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        n_kv_heads, n_queries, n_keys, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of one key source; a program owns BLOCK_N keys of one (batch, kv head) and walks the packed query
    rows of the head group that can see them (Lse/Delta are contiguous [B, Hq, Tq])."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    h_kv = pid_bh % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < n_keys

    k_pos, k_seg, k_visible = _load_key_meta(PosK + b * n_keys, SegK + b * n_keys, ValidK + b * n_keys, offs_n,
                                             n_keys, HAS_SEG, HAS_VALID)
    k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count = _extent(k_pos, k_seg, k_visible)
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=k_visible[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=k_visible[:, None], other=0.0)
    if CAST_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    PosQ_b = PosQ + b * n_queries
    SegQ_b = SegQ + b * n_queries
    first, last = _query_tile_range(k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count, PosQ_b, SegQ_b, n_queries,
                                    GROUP, BLOCK_M, BLOCK_N, HAS_SEG)
    n_rows = n_queries * GROUP
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        t = rows // GROUP
        h_q = h_kv * GROUP + rows % GROUP
        q_pos, q_seg = _load_query_meta(PosQ_b, SegQ_b, t, row_ok, HAS_SEG)
        q = tl.load(Q + b * stride_qb + h_q[:, None] * stride_qh + t[:, None] * stride_qt
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h_q[:, None] * stride_doh + t[:, None] * stride_dot
                     + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
        row_index = (b * n_kv_heads * GROUP + h_q) * n_queries + t
        lse = tl.load(Lse + row_index, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row_index, mask=row_ok, other=0.0)
        if CAST_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, _ = _extent(q_pos, q_seg, row_ok)
        _, full = _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
                            BLOCK_N)
        # lse -inf marks a row with nothing visible: +inf makes its probabilities exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if not full:
            p = tl.where(_element_mask(q_pos, q_seg, k_pos, k_seg, k_visible, HAS_SEG), p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=in_range[:, None])
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=in_range[:, None])


@triton.jit
def _dq_one_source(dq, q, do, lse2, delta, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
                   K, V, stride_kt, stride_kd, stride_vt, stride_vd, Pos, Seg, Valid, n_keys, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr,
                   CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    first, last = _key_tile_range(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, Pos, Seg, Valid, n_keys, BLOCK_N,
                                  HAS_SEG, HAS_VALID)
    for tile in range(first, last):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_pos, k_seg, k_visible = _load_key_meta(Pos, Seg, Valid, offs_n, n_keys, HAS_SEG, HAS_VALID)
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=k_visible[:, None],
                    other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=k_visible[:, None],
                    other=0.0)
        if CAST_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count = _extent(k_pos, k_seg, k_visible)
        _, full = _classify(q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, k_pos_lo, k_pos_hi, k_seg_lo, k_seg_hi, k_count,
                            BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if not full:
            p = tl.where(_element_mask(q_pos, q_seg, k_pos, k_seg, k_visible, HAS_SEG), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _two_source_bwd_dq_kernel(
        Q, Ks, Vs, Ko, Vo, DO, Lse, Delta, DQ,
        PosQ, PosS, PosO, SegQ, SegS, SegO, ValidS, ValidO,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_ksb, stride_ksh, stride_kst, stride_ksd,
        stride_vsb, stride_vsh, stride_vst, stride_vsd,
        stride_kob, stride_koh, stride_kot, stride_kod,
        stride_vob, stride_voh, stride_vot, stride_vod,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        n_kv_heads, n_queries, n_shared, n_own, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_VALID_SHARED: tl.constexpr, HAS_VALID_OWN: tl.constexpr,
        CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    h_kv = pid_bh % n_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries * GROUP
    t = rows // GROUP
    h_q = h_kv * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + b * stride_qb + h_q[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h_q[:, None] * stride_doh + t[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_index = (b * n_kv_heads * GROUP + h_q) * n_queries + t
    lse = tl.load(Lse + row_index, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(Delta + row_index, mask=row_ok, other=0.0)
    q_pos, q_seg = _load_query_meta(PosQ + b * n_queries, SegQ + b * n_queries, t, row_ok, HAS_SEG)
    q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi, _ = _extent(q_pos, q_seg, row_ok)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_one_source(dq, q, do, lse2, delta, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
                        Ks + b * stride_ksb + h_kv * stride_ksh, Vs + b * stride_vsb + h_kv * stride_vsh,
                        stride_kst, stride_ksd, stride_vst, stride_vsd,
                        PosS + b * n_shared, SegS + b * n_shared, ValidS + b * n_shared, n_shared, qk_scale,
                        HEAD_DIM, BLOCK_N, HAS_SEG, HAS_VALID_SHARED, CAST_FP32, DOT_PRECISION)
    dq = _dq_one_source(dq, q, do, lse2, delta, q_pos, q_seg, q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi,
                        Ko + b * stride_kob + h_kv * stride_koh, Vo + b * stride_vob + h_kv * stride_voh,
                        stride_kot, stride_kod, stride_vot, stride_vod,
                        PosO + b * n_own, SegO + b * n_own, ValidO + b * n_own, n_own, qk_scale,
                        HEAD_DIM, BLOCK_N, HAS_SEG, HAS_VALID_OWN, CAST_FP32, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h_q[:, None] * stride_dqh + t[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------

def _kernel_flags(dtype: torch.dtype) -> dict:
    # Under the interpreter bf16 tl.dot is wrong (upstream triton issue #11584): compute on fp32 copies.
    cast = INTERPRETING and dtype != torch.float32
    precision = "ieee" if (dtype == torch.float32 or cast) else "tf32"  # "tf32" is the default; unused for 16-bit
    return {"CAST_FP32": cast, "DOT_PRECISION": precision}


def _present(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an absent or empty tensor (never read: its loops run zero times or a constexpr
    flag turns its loads off); an empty CUDA tensor has a null pointer, which Triton refuses."""
    return fallback if t is None or t.numel() == 0 else t


def two_source_forward(q, k_shared, v_shared, k_own, v_own, masks: MaskSpec, shapes: Shapes, scale: float, *,
                       out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       config: KernelConfig | None = None, tile_stats: torch.Tensor | None = None):
    """Launch the forward kernel. `masks` must come from `MaskSpec.for_kernel()`. `out`/`lse` may be given
    (any strides) to write into; `tile_stats` (int32, 6 elements, zeroed) receives the number of skipped /
    full / masked tiles for the shared then the own source."""
    config = config or default_forward_config(shapes.head_dim, q.dtype)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if shapes.batch == 0 or shapes.n_queries == 0:
        return out, lse
    ks, vs = _present(k_shared, q), _present(v_shared, q)
    ko, vo = _present(k_own, q), _present(v_own, q)
    pos_s, pos_o = _present(masks.pos_shared, masks.pos_q), _present(masks.pos_own, masks.pos_q)
    seg_q = _present(masks.seg_q, masks.pos_q)
    seg_s, seg_o = _present(masks.seg_shared, masks.pos_q), _present(masks.seg_own, masks.pos_q)
    valid_s, valid_o = _present(masks.valid_shared, masks.pos_q), _present(masks.valid_own, masks.pos_q)
    stats = tile_stats if tile_stats is not None else masks.pos_q
    grid = (triton.cdiv(shapes.n_queries * shapes.group, config.block_m), shapes.batch * shapes.kv_heads)
    _two_source_fwd_kernel[grid](
        q, ks, vs, ko, vo, out, lse, stats,
        masks.pos_q, pos_s, pos_o, seg_q, seg_s, seg_o, valid_s, valid_o,
        *q.stride(), *ks.stride(), *vs.stride(), *ko.stride(), *vo.stride(), *out.stride(), *lse.stride(),
        shapes.kv_heads, shapes.n_queries, shapes.n_shared, shapes.n_own, scale * LOG2E,
        GROUP=shapes.group, HEAD_DIM=shapes.head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HAS_SEG=masks.has_segments, HAS_VALID_SHARED=masks.valid_shared is not None,
        HAS_VALID_OWN=masks.valid_own is not None, COUNT_TILES=tile_stats is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **_kernel_flags(q.dtype))
    return out, lse


def _key_source_grads(q, k, v, d_out, lse, delta, pos_k, seg_k, valid_k, masks: MaskSpec, shapes: Shapes,
                      n_keys: int, scale: float, config: KernelConfig):
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if n_keys == 0 or shapes.batch == 0:
        return dk, dv
    if shapes.n_queries == 0:
        return dk.zero_(), dv.zero_()
    grid = (triton.cdiv(n_keys, config.block_n), shapes.batch * shapes.kv_heads)
    _two_source_bwd_dkv_kernel[grid](
        q, k, v, d_out, lse, delta, dk, dv,
        masks.pos_q, pos_k, _present(masks.seg_q, masks.pos_q), _present(seg_k, pos_k), _present(valid_k, pos_k),
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *dk.stride(), *dv.stride(),
        shapes.kv_heads, shapes.n_queries, n_keys, scale * LOG2E, scale,
        GROUP=shapes.group, HEAD_DIM=shapes.head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HAS_SEG=masks.has_segments, HAS_VALID=valid_k is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **_kernel_flags(q.dtype))
    return dk, dv


def two_source_backward(q, k_shared, v_shared, k_own, v_own, out, lse, d_out, masks: MaskSpec, shapes: Shapes,
                        scale: float, needs: tuple[bool, bool, bool], config: KernelConfig | None = None):
    """Gradients (dq, (dk_shared, dv_shared), (dk_own, dv_own)); an entry is None when `needs` says so.
    `needs` = (q, shared K/V, own K/V)."""
    config = config or default_backward_config(shapes.head_dim, q.dtype)
    lse = lse.contiguous()
    delta = (d_out.float() * out.float()).sum(dim=-1).contiguous()  # rowsum(dO * O), [B, Hq, Tq]
    need_q, need_shared, need_own = needs
    dq = shared = own = None
    if need_shared:
        shared = _key_source_grads(q, k_shared, v_shared, d_out, lse, delta, masks.pos_shared, masks.seg_shared,
                                   masks.valid_shared, masks, shapes, shapes.n_shared, scale, config)
    if need_own:
        own = _key_source_grads(q, k_own, v_own, d_out, lse, delta, masks.pos_own, masks.seg_own,
                                masks.valid_own, masks, shapes, shapes.n_own, scale, config)
    if need_q:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        if shapes.batch and shapes.n_queries:
            ks, vs = _present(k_shared, q), _present(v_shared, q)
            ko, vo = _present(k_own, q), _present(v_own, q)
            grid = (triton.cdiv(shapes.n_queries * shapes.group, config.block_m), shapes.batch * shapes.kv_heads)
            _two_source_bwd_dq_kernel[grid](
                q, ks, vs, ko, vo, d_out, lse, delta, dq,
                masks.pos_q, _present(masks.pos_shared, masks.pos_q), _present(masks.pos_own, masks.pos_q),
                _present(masks.seg_q, masks.pos_q), _present(masks.seg_shared, masks.pos_q),
                _present(masks.seg_own, masks.pos_q), _present(masks.valid_shared, masks.pos_q),
                _present(masks.valid_own, masks.pos_q),
                *q.stride(), *ks.stride(), *vs.stride(), *ko.stride(), *vo.stride(), *d_out.stride(), *dq.stride(),
                shapes.kv_heads, shapes.n_queries, shapes.n_shared, shapes.n_own, scale * LOG2E, scale,
                GROUP=shapes.group, HEAD_DIM=shapes.head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                HAS_SEG=masks.has_segments, HAS_VALID_SHARED=masks.valid_shared is not None,
                HAS_VALID_OWN=masks.valid_own is not None,
                num_warps=config.num_warps, num_stages=config.num_stages, **_kernel_flags(q.dtype))
    return dq, shared, own
