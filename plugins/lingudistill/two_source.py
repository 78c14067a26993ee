"""The teacher's attention over two K/V sources: the student's at shared positions, its own elsewhere.

The teacher runs on its queries of all rows packed into one sequence (`layout.SequenceLayout`), so its
projections and MLPs see no padding. Attention is per row: `PackedAttention` holds, once per forward, the row
bounds and masks every layer reuses.

* `two_source_attention` (text-only pass): per row, masked SDPA over {shared keys} ∪ {own keys} on the CPU (or
  with kernel="torch"); the fused Triton kernel of `vlmdistill.kernels` on CUDA, on the rows unpacked into a
  padded batch (padding queries see no key, so their tiles are skipped).
* `replaced_attention` (full-length reference): the teacher's K/V with the student's written over the shared
  positions, then ordinary causal attention per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import SequenceLayout


def fused_kernel():
    """`vlmdistill.kernels.two_source_attention`, or None where the kernels package is not installed."""
    try:
        from vlmdistill.kernels import two_source_attention
    except ImportError:
        return None
    return two_source_attention


def _visible(pos_q, pos_k, valid_k, seg_q=None, seg_k=None):
    """`[Tq, Tk]` bool: key j is visible to query i (causal by sequence index, same document, valid)."""
    allowed = (pos_k[None, :] <= pos_q[:, None]) & valid_k[None, :]
    if seg_q is not None:
        allowed &= seg_k[None, :] == seg_q[:, None]
    return allowed


class PackedAttention:
    """Row bounds and per-row masks of one packed teacher pass on one device, shared by all its layers."""

    def __init__(self, layout: SequenceLayout, device, *, full_length: bool):
        self.layout = layout = layout.to(device)
        self.full_length = full_length
        q_off, s_off = layout.query_offsets, layout.shared_offsets
        self.query_bounds = list(zip(q_off[:-1], q_off[1:]))
        self.shared_bounds = list(zip(s_off[:-1], s_off[1:]))
        self.query_segments = layout.query_segments()
        self.shared_segments = layout.shared_segments()
        self._masks: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._padded: dict | None = None

    def row_masks(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per row: the `[1, 1, Tq, Tk]` SDPA mask (keys: shared then own; own only in the full-length pass) and the
        queries that see no key at all (None when there are none): SDPA would give NaN there, they get 0."""
        if self._masks is None:
            lay, seg_q, seg_s = self.layout, self.query_segments, self.shared_segments
            masks = []
            for (qa, qb), (sa, sb) in zip(self.query_bounds, self.shared_bounds):
                pos_q = lay.query_index[qa:qb]
                sq = seg_q[qa:qb] if seg_q is not None else None
                if self.full_length:
                    allowed = _visible(pos_q, pos_q, torch.ones_like(pos_q, dtype=torch.bool), sq, sq)
                else:
                    pos_k = torch.cat([lay.shared_index[sa:sb], pos_q])
                    valid_k = torch.cat([torch.ones(sb - sa, dtype=torch.bool, device=pos_q.device),
                                         lay.own_valid[qa:qb]])
                    seg_k = torch.cat([seg_s[sa:sb], sq]) if sq is not None else None
                    allowed = _visible(pos_q, pos_k, valid_k, sq, seg_k)
                empty = ~allowed.any(-1)
                # 4-D: with a 3-D mask SDPA leaves its fused CPU kernel for the 3x slower math path
                if bool(empty.any()):
                    masks.append(((allowed | empty[:, None])[None, None], empty))
                else:
                    masks.append((allowed[None, None], None))
            self._masks = masks
        return self._masks

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


def _attend_rows(q, keys, values, plan: PackedAttention, scale: float) -> torch.Tensor:
    """Per-row masked SDPA. `keys(r, qa, qb)` / `values(...)` give row r's `[1, Hkv, Tk, D]` keys and values
    in the mask's order."""
    outs = []
    for r, ((qa, qb), (allowed, empty)) in enumerate(zip(plan.query_bounds, plan.row_masks())):
        k, v = keys(r, qa, qb), values(r, qa, qb)
        out = F.scaled_dot_product_attention(q[:, :, qa:qb], k, v, attn_mask=allowed, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out if empty is None else out.masked_fill(empty[None, None, :, None], 0.0))
    return torch.cat(outs, dim=2)


def torch_two_source_attention(q, k_shared, v_shared, k_own, v_own, plan: PackedAttention, scale: float):
    """q `[1, Hq, Nq, D]`, own K/V `[1, Hkv, Nq, D]`, shared K/V `[1, Hkv, Ns, D]` (packed, GQA unexpanded);
    query i reads key j iff j comes no later in the row, is in the same document and is valid."""
    bounds = plan.shared_bounds

    def cat(shared, own):
        return lambda r, qa, qb: torch.cat([shared[:, :, bounds[r][0]:bounds[r][1]], own[:, :, qa:qb]], dim=2)

    return _attend_rows(q, cat(k_shared, k_own), cat(v_shared, v_own), plan, scale)


def _kernel_fits(q: torch.Tensor) -> bool:
    from vlmdistill.kernels import KERNEL_HEAD_DIMS

    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] in KERNEL_HEAD_DIMS


def two_source_attention(q, k_shared, v_shared, k_own, v_own, plan: PackedAttention, *, kernel: str, scale: float):
    """'triton': the fused kernel; 'auto': the fused kernel on CUDA when dtype and head_dim fit, masked SDPA
    otherwise; 'torch': masked SDPA. Returns `[1, Hq, Nq, D]`."""
    fused = fused_kernel() if kernel != "torch" else None
    if kernel == "triton" and fused is None:
        raise RuntimeError("kernel='triton' needs vlmdistill.kernels, which is not installed")
    if fused is not None and (kernel == "triton" or _kernel_fits(q)):
        # One dtype for the kernel: under autocast RoPE leaves q and k in fp32 and v in the autocast dtype, and
        # SDPA would run in the autocast dtype too
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
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
    return _attend_rows(q, lambda r, qa, qb: k[:, :, qa:qb], lambda r, qa, qb: v[:, :, qa:qb], plan, scale)
