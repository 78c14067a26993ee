"""Which positions the teacher shares, queries and distils, as compact per-row index tensors.

Masks over the student's sequence (`[B, T]`):
* shared S: the teacher reads the student's K/V there (visual tokens, tokens the teacher cannot read, and the
  prompt or everything depending on `share_scope`);
* distilled D: logit rows t (predicting token t+1) that enter the KL: supervised, in a distilled sample, and at a
  token the teacher can read;
* queried Q: where the teacher computes hidden states. Text-only form: every non-shared position it needs (its
  own K/V come from there) plus D; full-length form: every position.

Causality uses the sequence index (exactly the student's own causal order); RoPE uses the student's absolute
positions, so relative offsets agree even when positions jump (mRoPE) or restart (packed documents).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SequenceLayout:
    #: [Bk] student batch rows the teacher runs on (samples with at least one distilled row)
    rows: torch.Tensor
    #: [Bk, Ts] sequence index of each shared key, and whether the slot is real (rows have different counts)
    shared_index: torch.Tensor
    shared_valid: torch.Tensor
    #: [Bk, Tq] sequence index of each teacher query, whether the slot is real, and whether the teacher keeps
    #: its own K/V there (False where the position is shared)
    query_index: torch.Tensor
    query_valid: torch.Tensor
    own_valid: torch.Tensor
    #: [Bk, T] document ids of packed rows, or None
    segments: torch.Tensor | None
    #: distilled rows: (index into Bk, slot into Tq) for the teacher, (batch row, position) for the student
    distill_slot: tuple[torch.Tensor, torch.Tensor]
    distill_position: tuple[torch.Tensor, torch.Tensor]

    def to(self, device) -> "SequenceLayout":
        """The same layout with its tensors on `device` (a teacher on another device than the student)."""
        if self.query_index.device == torch.device(device):
            return self

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, tuple):
                return tuple(v.to(device) for v in value)
            return value

        return SequenceLayout(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @property
    def num_distilled(self) -> int:
        return int(self.distill_position[0].numel())

    def shared_segments(self) -> torch.Tensor | None:
        return None if self.segments is None else self.segments.gather(1, self.shared_index)

    def query_segments(self) -> torch.Tensor | None:
        return None if self.segments is None else self.segments.gather(1, self.query_index)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row indices of the True entries, left-aligned and padded: (index [B, K], valid [B, K])."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return order, valid


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
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows & kd_mask[:, None] & readable


def build_layout(*, shared: torch.Tensor, distilled: torch.Tensor, valid: torch.Tensor,
                 segments: torch.Tensor | None, full_length: bool) -> SequenceLayout:
    """Index tensors for the teacher pass over the samples that have distilled rows."""
    shared = shared & valid
    rows = distilled.any(1).nonzero().squeeze(1)
    shared, distilled, valid = shared[rows], distilled[rows], valid[rows]
    segments = segments[rows] if segments is not None else None
    if full_length:
        queried = torch.ones_like(valid)
    else:
        queried = (valid & ~shared) | distilled
        # Nothing after a row's last distilled position can influence it (causality): skip that tail.
        index = torch.arange(valid.shape[1], device=valid.device)
        last = torch.where(distilled, index, torch.full_like(index, -1)).amax(1, keepdim=True)
        queried &= index[None, :] <= last
    shared_index, shared_valid = compact(shared)
    query_index, query_valid = compact(queried)
    own_valid = query_valid & (valid & ~shared).gather(1, query_index)
    slot_of = queried.long().cumsum(1) - 1
    r, t = distilled.nonzero(as_tuple=True)
    return SequenceLayout(rows=rows, shared_index=shared_index, shared_valid=shared_valid, query_index=query_index,
                          query_valid=query_valid & valid.gather(1, query_index) if full_length else query_valid,
                          own_valid=own_valid, segments=segments, distill_slot=(r, slot_of[r, t]),
                          distill_position=(rows[r], t))
