"""The teacher's attention over two K/V sources: the student's at shared positions, its own elsewhere.

The teacher runs on its queries of all rows packed into one sequence (`layout.SequenceLayout`), so its
projections and MLPs see no padding. Attention is per row, in blocks of queries: `PackedAttention` holds, once
per forward, the blocks and masks every layer reuses.

* `two_source_attention` (text-only pass): masked SDPA over {shared keys} ∪ {own keys} in sequence order, each
  block of queries over the run of keys it can see, on the CPU (or with kernel="torch"); the fused Triton kernel
  of `vlmdistill.kernels` on CUDA, on the rows unpacked into a padded batch (padding queries see no key, so their
  tiles are skipped).
* `replaced_attention` (full-length reference): the teacher's K/V with the student's written over the shared
  positions, then ordinary causal attention per row.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .layout import SequenceLayout


#: queries per attention call: a block computes its keys' pairs in full, so its causal waste is ~ block² / 2
QUERY_BLOCK = 128


@dataclasses.dataclass
class QueryBlock:
    """One attention call: packed queries `queries` over keys `keys` of the merged key sequence."""

    queries: slice
    keys: slice
    allowed: torch.Tensor          # [Tq, Tk] bool
    empty: torch.Tensor | None     # [Tq] queries that see no key (None: there are none)


def _visible(pos_q, pos_k, valid_k, seg_q=None, seg_k=None):
    """`[Tq, Tk]` bool: key j is visible to query i (causal by sequence index, same document, valid)."""
    allowed = (pos_k[None, :] <= pos_q[:, None]) & valid_k[None, :]
    if seg_q is not None:
        allowed &= seg_k[None, :] == seg_q[:, None]
    return allowed


class PackedAttention:
    """Row bounds, attention blocks and masks of one packed teacher pass on one device, shared by all its layers."""

    def __init__(self, layout: SequenceLayout, device, *, full_length: bool):
        self.layout = layout = layout.to(device)
        self.full_length = full_length
        q_off, s_off = layout.query_offsets, layout.shared_offsets
        self.query_bounds = list(zip(q_off[:-1], q_off[1:]))
        self.shared_bounds = list(zip(s_off[:-1], s_off[1:]))
        self.query_segments = layout.query_segments()
        self.shared_segments = layout.shared_segments()
        self._blocks: list[QueryBlock] | None = None
        self._float_masks: dict[torch.dtype, list[torch.Tensor]] = {}
        #: text-only pass: for each slot of the merged key sequence, its index in cat([shared keys, own keys])
        self.key_order: torch.Tensor | None = None
        self._padded: dict | None = None

    def blocks(self) -> list[QueryBlock]:
        """The attention calls of one layer, built once per forward. Each row's keys sit in sequence order in the
        merged key sequence (`key_order`), so a block of consecutive queries sees a contiguous run of them: the
        block attends to that run only (on the CPU, masked SDPA computes every (query, key) pair it is given)."""
        if self._blocks is None:
            lay, seg_q, seg_s = self.layout, self.query_segments, self.shared_segments
            device = lay.query_index.device
            blocks, orders = [], []
            for (qa, qb), (sa, sb) in zip(self.query_bounds, self.shared_bounds):
                pos_q = lay.query_index[qa:qb]
                sq = seg_q[qa:qb] if seg_q is not None else None
                if self.full_length:
                    # the row's keys are its own queries, already in sequence order in the packed sequence
                    pos_k, valid_k, seg_k = pos_q, torch.ones_like(pos_q, dtype=torch.bool), sq
                else:
                    # shared before own at equal positions (a distilled row at a shared position reads the student's)
                    pos_k = torch.cat([lay.shared_index[sa:sb], pos_q])
                    order = torch.argsort(pos_k, stable=True)
                    pos_k = pos_k[order]
                    valid_k = torch.cat([torch.ones(sb - sa, dtype=torch.bool, device=device),
                                         lay.own_valid[qa:qb]])[order]
                    seg_k = torch.cat([seg_s[sa:sb], sq])[order] if sq is not None else None
                    # index into cat([all shared keys, all own keys])
                    source = torch.cat([torch.arange(sa, sb, device=device),
                                        lay.shared_offsets[-1] + torch.arange(qa, qb, device=device)])[order]
                    orders.append(source)
                key_start = qa if self.full_length else qa + sa  # the row's first key in the merged sequence
                for i in range(0, qb - qa, QUERY_BLOCK):
                    j = min(i + QUERY_BLOCK, qb - qa)
                    allowed = _visible(pos_q[i:j], pos_k, valid_k, sq[i:j] if sq is not None else None, seg_k)
                    seen = allowed.any(0).nonzero()
                    ka, kb = (int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 1)
                    allowed = allowed[:, ka:kb]
                    empty = ~allowed.any(-1)
                    blocks.append(QueryBlock(queries=slice(qa + i, qa + j), keys=slice(key_start + ka, key_start + kb),
                                             allowed=allowed, empty=empty if bool(empty.any()) else None))
            self.key_order = torch.cat(orders) if orders else None
            self._blocks = blocks
        return self._blocks

    def masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each block's `[1, 1, Tq, Tk]` additive mask in `dtype` (a boolean mask SDPA would convert at every call,
        and a 3-D one sends it to the 3x slower math path on the CPU). Queries that see no key get a row of
        zeros (SDPA would give NaN there) and are zeroed afterwards."""
        if dtype not in self._float_masks:
            self._float_masks[dtype] = [
                torch.zeros(b.allowed.shape, dtype=dtype, device=b.allowed.device).masked_fill_(
                    ~(b.allowed if b.empty is None else b.allowed | b.empty[:, None]), float("-inf"))[None, None]
                for b in self.blocks()]
        return self._float_masks[dtype]

    # ------------------------------------------------------------------ padded rows (for the fused kernel)
    def padded(self) -> dict:
        """Where each packed query / shared key sits in a `[Bk, T_max]` batch, and the kernel's metadata there."""
        if self._padded is None:
            lay = self.layout
            device = lay.query_index.device
            q_counts = [b - a for a, b in self.query_bounds]
            s_counts = [b - a for a, b in self.shared_bounds]
            q_row, q_col = _row_and_column(q_counts, device)
            s_row, s_col = _row_and_column(s_counts, device)
            rows, tq, ts = len(q_counts), max(q_counts), max(s_counts, default=0)
            pos_q = torch.full((rows, tq), -1, dtype=torch.int32, device=device)  # padding: sees no key
            pos_q[q_row, q_col] = lay.query_index.to(torch.int32)
            valid_own = torch.zeros(rows, tq, dtype=torch.bool, device=device)
            valid_own[q_row, q_col] = lay.own_valid
            pos_s = torch.zeros(rows, ts, dtype=torch.int32, device=device)
            pos_s[s_row, s_col] = lay.shared_index.to(torch.int32)
            valid_s = torch.zeros(rows, ts, dtype=torch.bool, device=device)
            valid_s[s_row, s_col] = True
            meta = dict(pos_q=pos_q, pos_shared=pos_s, pos_own=pos_q.clamp_min(0), valid_shared=valid_s,
                        valid_own=valid_own)
            if self.query_segments is not None:
                seg_q = torch.zeros(rows, tq, dtype=torch.int32, device=device)
                seg_q[q_row, q_col] = self.query_segments.to(torch.int32)
                seg_s = torch.zeros(rows, ts, dtype=torch.int32, device=device)
                seg_s[s_row, s_col] = self.shared_segments.to(torch.int32)
                meta.update(seg_q=seg_q, seg_shared=seg_s, seg_own=seg_q)
            self._padded = {"query": (q_row, q_col, tq), "shared": (s_row, s_col, ts), "meta": meta}
        return self._padded

    def unpack(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """`[1, H, N, D]` packed -> `[Bk, H, T_max, D]` (zeros at padding)."""
        row, col, width = self.padded()[which]
        out = x.new_zeros(len(self.query_bounds), x.shape[1], width, x.shape[3])
        out[row, :, col] = x[0].transpose(0, 1)
        return out

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """`[Bk, H, T_max, D]` -> the packed queries `[1, H, Nq, D]`."""
        row, col, _ = self.padded()["query"]
        return x[row, :, col].transpose(0, 1)[None]


def _row_and_column(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed slots of rows with `counts` entries: their row and their column within the row."""
    count = torch.tensor(counts, device=device)
    row = torch.repeat_interleave(torch.arange(len(counts), device=device), count)
    start = torch.cumsum(count, 0) - count
    return row, torch.arange(int(count.sum()), device=device) - start[row]


def _attend_blocks(q, k, v, plan: PackedAttention, scale: float) -> torch.Tensor:
    """Masked SDPA block by block; k / v `[1, Hkv, Nk, D]` are the merged key sequence."""
    outs = []
    for block, mask in zip(plan.blocks(), plan.masks(q.dtype)):
        out = F.scaled_dot_product_attention(q[:, :, block.queries], k[:, :, block.keys], v[:, :, block.keys],
                                             attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out if block.empty is None else out.masked_fill(block.empty[None, None, :, None], 0.0))
    return torch.cat(outs, dim=2)


def torch_two_source_attention(q, k_shared, v_shared, k_own, v_own, plan: PackedAttention, scale: float):
    """q `[1, Hq, Nq, D]`, own K/V `[1, Hkv, Nq, D]`, shared K/V `[1, Hkv, Ns, D]` (packed, GQA unexpanded);
    query i reads key j iff j comes no later in the row, is in the same document and is valid."""
    plan.blocks()
    order = plan.key_order
    k = torch.cat([k_shared, k_own], dim=2).index_select(2, order)
    v = torch.cat([v_shared, v_own], dim=2).index_select(2, order)
    return _attend_blocks(q, k, v, plan, scale)


def two_source_attention(q, k_shared, v_shared, k_own, v_own, plan: PackedAttention, *, kernel: str, scale: float):
    """The backend `vlmdistill.kernels.resolve_backend` chooses ('auto': the fused kernel on CUDA when dtype and
    head_dim fit, masked SDPA otherwise). Returns `[1, Hq, Nq, D]`."""
    from vlmdistill.kernels import resolve_backend

    device = q.device.type
    # One dtype for the kernel: under autocast RoPE leaves q and k in fp32 and v in the autocast dtype, and
    # SDPA would run in the autocast dtype too
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if resolve_backend(kernel, q.shape[-1], dtype, q.device) == "triton":
        from vlmdistill.kernels import two_source_attention as fused

        q, k_shared, v_shared, k_own, v_own = (t.to(dtype) for t in (q, k_shared, v_shared, k_own, v_own))
        out, _ = fused(plan.unpack(q, "query"), plan.unpack(k_shared, "shared"), plan.unpack(v_shared, "shared"),
                       plan.unpack(k_own, "query"), plan.unpack(v_own, "query"), scale=scale, backend="triton",
                       **plan.padded()["meta"])
        return plan.pack(out)
    return torch_two_source_attention(q, k_shared, v_shared, k_own, v_own, plan, scale)


def replaced_attention(q, k, v, k_shared, v_shared, plan: PackedAttention, scale: float):
    """Full-length reference: every query over the teacher's K/V with the student's at the shared positions."""
    slot = plan.layout.shared_slot
    k = k.index_copy(2, slot, k_shared.to(k.dtype))
    v = v.index_copy(2, slot, v_shared.to(v.dtype))
    return _attend_blocks(q, k, v, plan, scale)
