"""Loss sums in plain autograd, for the `detach_shared_kv=False` ablation, where the KD gradient must also
reach the teacher's logits (and through them the student's shared K/V). The default path is
`vlmdistill.losses.task_and_distill_sums`. The teacher's LM head still runs chunk by chunk, on the distilled rows only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlmdistill.losses import reference_divergence, supervised_rows


def task_ce_sums(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor):
    """(Σ CE, Σ weight·CE) over supervised rows; `row_weight` `[B, T]` is the CE weight of each logit row."""
    rows = supervised_rows(labels)
    b, t = rows.nonzero(as_tuple=True)
    rows_logits = logits[b, t]
    ce = F.cross_entropy(rows_logits if rows_logits.dtype == torch.float64 else rows_logits.float(),
                         labels[b, t + 1], reduction="none")
    return ce.sum(), (ce * row_weight[b, t].to(ce.dtype)).sum()


def kd_sum(student_rows: torch.Tensor, teacher_hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
           *, width: int, kind: str, temperature: float, jsd_beta: float, chunk_rows: int) -> torch.Tensor:
    """Σ over rows of τ²·D(teacher ‖ student) on the first `width` vocabulary entries, differentiable on both
    sides."""
    wide = torch.promote_types(student_rows.dtype, torch.float32)
    total = torch.zeros((), dtype=wide, device=student_rows.device)
    for start in range(0, student_rows.shape[0], chunk_rows):
        s = student_rows[start:start + chunk_rows, :width]
        t = head(teacher_hidden[start:start + chunk_rows])[:, :width].to(s.device)
        rows = reference_divergence(s.to(wide), t.to(wide), kind=kind, temperature=temperature, jsd_beta=jsd_beta)
        total = total + rows.sum()
    return total
