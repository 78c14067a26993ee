"""CE on every supervised row and KD on the distilled ones, in one chunked pass with a fused gradient.

Per chunk of supervised rows it reads the student's logits in place, computes the weighted CE and, for the
distilled rows of the chunk, the teacher's logits (the teacher's LM head applied to those rows only) and the
divergence, and writes d(loss)/d(logits) for the chunk straight into the gradient of the `[B, T, V]` logits.
Nothing `[rows, V]`-sized outlives its chunk except that gradient, which backpropagation through the student's
LM head needs in any case: no gathered copies of the logits, no saved log-softmax, no teacher logits beyond
one chunk. (transformers' own CE upcasts the whole `[B, T, V]` logits to fp32 and keeps its log-softmax.)
The teacher side is constant here; the undetached ablation uses `loss.py`'s autograd form instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlmdistill.losses import rows_loss_and_grad


class _TaskAndDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows_b, rows_t, targets, ce_weight, kd_slot, teacher_hidden, head, alpha, width, kind,
                temperature, jsd_beta, chunk_rows):
        compute = torch.promote_types(logits.dtype, torch.float32)
        grad = torch.zeros_like(logits) if ctx.needs_input_grad[0] else None
        weighted = torch.zeros((), dtype=compute, device=logits.device)
        ce_total = torch.zeros_like(weighted)
        kd_total = torch.zeros_like(weighted)
        for start in range(0, rows_b.shape[0], chunk_rows):
            b, t = rows_b[start:start + chunk_rows], rows_t[start:start + chunk_rows]
            s = logits[b, t].to(compute)
            log_p = F.log_softmax(s, dim=-1)
            target = targets[start:start + chunk_rows]
            ce = -log_p.gather(1, target[:, None])[:, 0]
            w = ce_weight[start:start + chunk_rows].to(compute)
            ce_total += ce.sum()
            weighted += (w * ce).sum()
            g = None
            if grad is not None:
                g = log_p.exp_()  # softmax, in place of the log-softmax no longer needed
                g[torch.arange(g.shape[0], device=g.device), target] -= 1.0
                g *= w[:, None]
            slot = kd_slot[start:start + chunk_rows]
            chosen = (slot >= 0).nonzero().squeeze(1)
            if chosen.numel():
                teacher = head(teacher_hidden[slot[chosen]])[:, :width].to(device=s.device, dtype=compute)
                rows, g_kd = rows_loss_and_grad(s[chosen, :width], teacher, kind, temperature, jsd_beta)
                kd_total += rows.sum()
                weighted += alpha * rows.sum()
                if g is not None:
                    g[chosen, :width] += alpha * g_kd
            if grad is not None:
                grad[b, t] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return weighted, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_weighted, _ce, _kd):
        (grad,) = ctx.saved_tensors
        out = grad * grad_weighted.to(grad.dtype) if grad is not None else None
        return (out,) + (None,) * 13


def task_and_distill_sums(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor,
                          distilled: torch.Tensor, teacher_hidden: torch.Tensor | None,
                          head: Callable[[torch.Tensor], torch.Tensor], *, alpha: float, width: int, kind: str,
                          temperature: float, jsd_beta: float, chunk_rows: int):
    """(Σ w·CE + α·Σ KD, Σ CE, Σ KD) over the logit rows t with labels[t+1] supervised.

    `row_weight` `[B, T]`: CE weight per row; `distilled` `[B, T]`: rows with a KD term (a subset of the
    supervised rows), whose teacher hidden states `teacher_hidden` `[N_distilled, H]` come in row-major order.
    Only the first value carries a gradient (to `logits`)."""
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != -100
    rows_b, rows_t = supervised.nonzero(as_tuple=True)
    is_kd = distilled[rows_b, rows_t]
    kd_slot = torch.where(is_kd, is_kd.long().cumsum(0) - 1, torch.full_like(rows_b, -1))
    if teacher_hidden is None:
        kd_slot = torch.full_like(rows_b, -1)
        teacher_hidden = logits.new_zeros(0, 1)
    return _TaskAndDistill.apply(logits, rows_b, rows_t, labels[rows_b, rows_t + 1], row_weight[rows_b, rows_t],
                                 kd_slot, teacher_hidden, head, float(alpha), int(width), kind, float(temperature),
                                 float(jsd_beta), int(chunk_rows))
