"""The teacher side: its decoder, its LM head, and one pass over the queried positions.

The teacher model is called as a whole (so hooks users put on it still fire) with `logits_to_keep=1`; a forward
hook on its decoder keeps the final hidden states, and the LM head is applied later, only at distilled rows.
For `teacher="base"` the teacher is the PEFT student itself with adapters disabled: same decoder, same head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hf import base_model, forward_parameters

from .attention import ForwardState
from .compat import head_width
from .families import text_decoder
from .layout import SequenceLayout


@dataclasses.dataclass
class TeacherLM:
    model: nn.Module
    decoder: nn.Module
    head: nn.Module
    vocab_size: int
    pad_token_id: int
    #: the decoder takes the student's multi-axis (mRoPE) positions as they are
    multi_axis_positions: bool

    @classmethod
    def build(cls, teacher: nn.Module, *, is_student_base: bool, student_decoder: nn.Module) -> "TeacherLM":
        decoder = student_decoder if is_student_base else text_decoder(teacher, role="teacher")
        inner = base_model(teacher)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            raise UnsupportedModelError(f"teacher {type(inner).__name__} has no output embeddings (LM head)")
        names, _ = forward_parameters(teacher)
        missing = {"input_ids", "attention_mask", "position_ids", "logits_to_keep"} - names
        if missing:
            raise UnsupportedModelError(f"teacher {type(inner).__name__}.forward lacks {sorted(missing)}: "
                                        "lingudistill runs it on selected positions with explicit position ids")
        text_config = decoder.config
        pad = getattr(text_config, "pad_token_id", None)
        return cls(model=teacher, decoder=decoder, head=head, vocab_size=head_width(head),
                   pad_token_id=pad if isinstance(pad, int) and 0 <= pad < head_width(head) else 0,
                   multi_axis_positions=is_student_base)

    def positions_for(self, positions: torch.Tensor, layout: SequenceLayout, batch: int) -> torch.Tensor:
        """The student's positions at the teacher's query slots: `[Bk, Tq]` (or `[axes, Bk, Tq]` for the
        student's own mRoPE decoder; a 1-D RoPE teacher takes the text axis, equal on all axes for text)."""
        if positions.dim() == 3 and not self.multi_axis_positions:
            positions = positions[0]
        device = layout.query_index.device
        if positions.dim() == 2:
            rows = positions.to(device).expand(batch, -1)[layout.rows]
            return rows.gather(1, layout.query_index)
        rows = positions.to(device).expand(-1, batch, -1)[:, layout.rows]
        return rows.gather(2, layout.query_index.expand(rows.shape[0], -1, -1))

    def input_ids_for(self, input_ids: torch.Tensor, layout: SequenceLayout, unreadable: torch.Tensor) -> torch.Tensor:
        ids = input_ids[layout.rows].gather(1, layout.query_index)
        blocked = unreadable[layout.rows].gather(1, layout.query_index) | ~layout.query_valid
        return ids.masked_fill(blocked, self.pad_token_id)

    def run(self, state: ForwardState, input_ids: torch.Tensor, unreadable: torch.Tensor) -> torch.Tensor:
        """One teacher pass (the caller has put the teacher in eval mode and chosen autograd); returns the final
        hidden states at the query slots `[Bk, Tq, H]`."""
        layout = state.layout
        if state.positions is None:
            raise RuntimeError("lingudistill: the student's rotary embedding never reported its positions")
        kwargs: dict[str, Any] = dict(
            input_ids=self.input_ids_for(input_ids, layout, unreadable),
            attention_mask=layout.query_valid.long(),
            position_ids=self.positions_for(state.positions, layout, input_ids.shape[0]),
            logits_to_keep=1, use_cache=False)
        device = next(self.head.parameters()).device
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        state.role = "teacher"
        state.teacher_hidden = None
        try:
            self.model(**kwargs)
        finally:
            state.role = "done"
        if state.teacher_hidden is None:
            raise RuntimeError("lingudistill: the teacher's decoder produced no hidden states")
        return state.teacher_hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def head_available(self):
        """Context for `logits`: the head runs after the teacher's forward, on chunks of rows, so a sharded
        head (FSDP2 unit resharded after forward, ZeRO-3 partitions) is gathered for the duration."""
        from vlmdistill.distributed import unsharded

        return unsharded(self.model, self.head)
