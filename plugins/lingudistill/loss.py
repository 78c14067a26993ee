"""Loss sums: per-token CE with per-sample weights, and the KD term over distilled rows only.

The teacher's LM head runs chunk by chunk on the distilled rows, so teacher logits exist for one chunk at a
time and never for unselected positions; `vlmdistill.losses.divergence_loss` fuses the gradient. When the
shared K/V are not detached the KD gradient must also reach the teacher's logits, which `divergence_loss`
(teacher side constant) does not do: that ablation uses the plain-autograd form.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlmdistill.losses import divergence_loss, reference_divergence


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` logit rows t whose target labels[t+1] is supervised (the causal-LM shift)."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def task_ce_sums(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor):
    """(Σ CE, Σ weight·CE) over supervised rows; `row_weight` `[B, T]` is the CE weight of each logit row."""
    rows = supervised(labels)
    b, t = rows.nonzero(as_tuple=True)
    rows_logits = logits[b, t]
    ce = F.cross_entropy(rows_logits if rows_logits.dtype == torch.float64 else rows_logits.float(),
                         labels[b, t + 1], reduction="none")
    return ce.sum(), (ce * row_weight[b, t].to(ce.dtype)).sum()


def kd_sum(student_rows: torch.Tensor, teacher_hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
           *, width: int, kind: str, temperature: float, jsd_beta: float, chunk_rows: int,
           teacher_grad: bool) -> torch.Tensor:
    """Σ over rows of τ²·D(teacher ‖ student) on the first `width` vocabulary entries (fp32 scalar)."""
    total = torch.zeros((), dtype=torch.float32, device=student_rows.device)
    for start in range(0, student_rows.shape[0], chunk_rows):
        s = student_rows[start:start + chunk_rows, :width]
        t = head(teacher_hidden[start:start + chunk_rows])[:, :width].to(s.device)
        if teacher_grad:
            wide = torch.promote_types(s.dtype, torch.float32)
            rows = reference_divergence(s.to(wide), t.to(wide), kind=kind, temperature=temperature, jsd_beta=jsd_beta)
            total = total + rows.sum()
        else:
            total = total + divergence_loss(s, t, kind=kind, temperature=temperature, jsd_beta=jsd_beta,
                                            chunk_rows=chunk_rows)
    return total
