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
        """The student's positions at the teacher's packed slots: `[1, Nq]` (or `[axes, 1, Nq]` for the
        student's own mRoPE decoder; a 1-D RoPE teacher takes the text axis, equal on all axes for text)."""
        if positions.dim() == 3 and not self.multi_axis_positions:
            positions = positions[0]
        device = layout.query_index.device
        row, index = layout.query_row, layout.query_index
        if positions.dim() == 2:
            return positions.to(device).expand(batch, -1)[row, index][None]
        return positions.to(device).expand(-1, batch, -1)[:, row, index][:, None]

    def input_ids_for(self, input_ids: torch.Tensor, layout: SequenceLayout, unreadable: torch.Tensor) -> torch.Tensor:
        row, index = layout.query_row, layout.query_index
        return input_ids[row, index].masked_fill(unreadable[row, index], self.pad_token_id)[None]

    def run(self, state: ForwardState, input_ids: torch.Tensor, unreadable: torch.Tensor) -> torch.Tensor:
        """One teacher pass over the packed queries (the caller has put the teacher in eval mode and chosen
        autograd); returns its final hidden states there, `[Nq, H]`."""
        layout = state.layout
        if state.positions is None:
            raise RuntimeError("lingudistill: the student's rotary embedding never reported its positions")
        ids = self.input_ids_for(input_ids, layout, unreadable)
        kwargs: dict[str, Any] = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids),
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
        return state.teacher_hidden[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def head_available(self):
        """Context for `logits`: the head runs after the teacher's forward, on chunks of rows, so a sharded
        head (FSDP2 unit resharded after forward, ZeRO-3 partitions) is gathered for the duration."""
        from vlmdistill.distributed import unsharded

        return unsharded(self.model, self.head)
