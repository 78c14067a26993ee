"""Which positions the teacher shares, queries and distils, packed into one sequence without padding.

Masks over the student's sequence (`[B, T]`):
* shared S: the teacher reads the student's K/V there (visual tokens, tokens the teacher cannot read, and the
  prompt or everything depending on `share_scope`);
* distilled D: logit rows t (predicting token t+1) that enter the KL: supervised, in a distilled sample, and at a
  token the teacher can read;
* queried Q: where the teacher computes hidden states. Text-only form: every non-shared position it needs (its
  own K/V come from there) plus D; full-length form: every real position.

The teacher runs on the queried positions of all its rows packed one after another (`[1, Nq]`): rows with fewer
text tokens (more images) cost it nothing for the difference, as they would padded to the longest row.
Causality uses the sequence index (exactly the student's own causal order); RoPE uses the student's absolute
positions, so relative offsets agree even when positions jump (mRoPE) or restart (packed documents).
"""

from __future__ import annotations

import dataclasses

import torch

from vlmdistill.losses import supervised_rows


@dataclasses.dataclass
class SequenceLayout:
    """Packed slot i of the teacher is position `query_index[i]` of student batch row `query_row[i]`; a row's
    slots are contiguous (`query_offsets[r]:query_offsets[r + 1]` for the r-th row of `rows`). The shared keys
    are packed the same way."""

    #: [Bk] student batch rows the teacher runs on (samples with at least one distilled row), ascending
    rows: torch.Tensor
    #: [Nq] batch row and sequence index of each teacher query, and whether the teacher keeps its own K/V there
    #: (False where the position is shared)
    query_row: torch.Tensor
    query_index: torch.Tensor
    own_valid: torch.Tensor
    query_offsets: tuple[int, ...]
    #: [Ns] batch row and sequence index of each shared key
    shared_row: torch.Tensor
    shared_index: torch.Tensor
    shared_offsets: tuple[int, ...]
    #: [Bk, T] document ids of packed rows, or None
    segments: torch.Tensor | None
    #: distilled rows in row-major order: their teacher slot, and their (batch row, position) for the student
    distill_slot: torch.Tensor
    distill_position: tuple[torch.Tensor, torch.Tensor]
    #: full-length pass only: the teacher slot of each shared key (where the student's K/V replace its own)
    shared_slot: torch.Tensor | None = None

    def to(self, device) -> "SequenceLayout":
        """The same layout with its tensors on `device` (a teacher on another device than the student)."""
        if self.query_index.device == torch.device(device):
            return self

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                return tuple(v.to(device) for v in value)
            return value

        return SequenceLayout(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @property
    def num_distilled(self) -> int:
        return int(self.distill_position[0].numel())

    @property
    def num_queries(self) -> int:
        return self.query_offsets[-1]

    def _segments_at(self, row: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        if self.segments is None:
            return None
        return self.segments[torch.searchsorted(self.rows, row), index]

    def query_segments(self) -> torch.Tensor | None:
        """[Nq] document id of each query (None: one document per row)."""
        return self._segments_at(self.query_row, self.query_index)

    def shared_segments(self) -> torch.Tensor | None:
        return self._segments_at(self.shared_row, self.shared_index)


def _offsets(counts: torch.Tensor) -> tuple[int, ...]:
    return tuple([0] + counts.cumsum(0).tolist())


def document_ids(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 use_cache: bool) -> torch.Tensor | None:
    """Packed documents as transformers reads them: 2-D position ids that restart, no attention mask and no
    KV cache (with a cache, transformers masks causally across documents, and so must the teacher)."""
    if attention_mask is not None or use_cache or position_ids is None or position_ids.dim() != 2:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    return find_packed_sequence_indices(position_ids)


def prompt_mask(labels: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """Positions before the first supervised token of their document."""
    supervised = (labels != -100).long()
    seen = supervised.cumsum(1)
    if segments is None:
        return seen == 0
    index = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    starts = torch.ones_like(supervised, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    before = (seen - supervised).gather(1, start_index)  # supervised tokens of earlier documents
    return seen - before == 0


def distilled_rows(labels: torch.Tensor, kd_mask: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """[B, T] logit rows t whose target labels[t+1] is supervised, in distilled samples, at readable tokens."""
    return supervised_rows(labels) & kd_mask[:, None] & readable


def build_layout(*, shared: torch.Tensor, distilled: torch.Tensor, valid: torch.Tensor,
                 segments: torch.Tensor | None, full_length: bool) -> SequenceLayout:
    """The packed teacher layout over the samples that have distilled rows."""
    shared = shared & valid
    rows = distilled.any(1).nonzero().squeeze(1)
    shared, distilled, valid = shared[rows], distilled[rows], valid[rows]
    segments = segments[rows] if segments is not None else None
    if full_length:
        queried = valid
    else:
        queried = (valid & ~shared) | distilled
        # Nothing after a row's last distilled position can influence it (causality): skip that tail.
        index = torch.arange(valid.shape[1], device=valid.device)
        last = torch.where(distilled, index, torch.full_like(index, -1)).amax(1, keepdim=True)
        queried = queried & (index[None, :] <= last)
    q_row, q_index = queried.nonzero(as_tuple=True)  # row-major: the packed order
    s_row, s_index = shared.nonzero(as_tuple=True)
    slot_of = (queried.flatten().long().cumsum(0) - 1).view_as(queried)
    d_row, d_index = distilled.nonzero(as_tuple=True)
    return SequenceLayout(rows=rows, query_row=rows[q_row], query_index=q_index,
                          own_valid=(valid & ~shared)[q_row, q_index], query_offsets=_offsets(queried.sum(1)),
                          shared_row=rows[s_row], shared_index=s_index, shared_offsets=_offsets(shared.sum(1)),
                          segments=segments, distill_slot=slot_of[d_row, d_index],
                          distill_position=(rows[d_row], d_index),
                          shared_slot=slot_of[s_row, s_index] if full_length else None)
