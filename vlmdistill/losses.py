"""Distillation losses over logit rows.

`divergence_loss` computes Σ_rows D(p_teacher, p_student) for forward KL, reverse KL or JSD(β) at
temperature τ (scaled by τ², Hinton et al.). It runs chunk by chunk and computes the gradient with
respect to the student logits in the same pass (Liger-style), so the fp32 softmax / log-softmax
intermediates of a `[N, V]` problem are never held all at once: the only `[N, V]`-sized tensor kept
for backward is the gradient, in the student's dtype.

`task_and_distill_sums` does the same for next-token CE and the divergence together: one pass over the
supervised rows of `[B, T, V]` logits, the teacher's logits produced per chunk (e.g. its LM head applied to
those rows only), and d(loss)/d(logits) computed in the same pass. Nothing `[rows, V]`-sized outlives its chunk
except that gradient, kept for the supervised rows only and scattered into the logits' shape in backward
(transformers' own CE upcasts the whole `[B, T, V]` logits to fp32 and keeps its log-softmax).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` logit rows t whose target labels[t+1] is supervised (the causal-LM shift; the last row has none)."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row (Sun et al., CVPR 2024, 'Logit Standardization in Knowledge Distillation'),
    in at least float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def rows_loss_and_grad(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, beta: float):
    """Per-row divergence and its gradient w.r.t. the student logits for one chunk (τ² included); the
    building block of fused losses that never keep softmax intermediates for backward."""
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if kind == "forward_kl":
        rows = (pt * (log_pt - log_ps)).sum(-1)
        grad_z = ps - pt
    elif kind == "reverse_kl":
        diff = log_ps - log_pt
        rows = (ps * diff).sum(-1)
        grad_z = ps * (diff - rows.unsqueeze(-1))
    elif kind == "jsd":
        # m = β·p_t + (1−β)·p_s;  JSD_β = β·KL(p_t‖m) + (1−β)·KL(p_s‖m)
        log_m = torch.logaddexp(log_pt + torch.log(torch.tensor(beta, dtype=s.dtype, device=s.device)),
                                log_ps + torch.log(torch.tensor(1.0 - beta, dtype=s.dtype, device=s.device)))
        rows = beta * (pt * (log_pt - log_m)).sum(-1) + (1.0 - beta) * (ps * (log_ps - log_m)).sum(-1)
        g = (1.0 - beta) * (log_ps - log_m)
        grad_z = ps * (g - (ps * g).sum(-1, keepdim=True))
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    scale = temperature * temperature
    # z = s / τ, so dL/ds = τ² · (1/τ) · dL/dz
    return rows * scale, grad_z * temperature


def auto_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 2^20 logits (4 MiB in fp32) on the CPU, where temporaries that stay in cache
    make the pass ~3x faster than one 1024 x 8192 chunk; about 2^24 on accelerators, where fewer, larger
    kernels win and 64 MiB temporaries are cheap."""
    budget = 1 << 20 if torch.device(device).type == "cpu" else 1 << 24
    return max(1, budget // max(1, vocab))


def _take(x: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    return x[start:stop] if rows is None else x.index_select(0, rows[start:stop])


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weights, student_rows, teacher_rows, kind, temperature, beta, chunk_rows):
        needs_grad = ctx.needs_input_grad[0]
        # fp32 at least (bf16/fp16 inputs), float64 kept for float64 inputs (reference checks).
        work = torch.float64 if student.dtype == torch.float64 else torch.float32
        n = student.shape[0] if student_rows is None else student_rows.numel()
        total = torch.zeros((), dtype=work, device=student.device)
        grad = student.new_empty((n, student.shape[1])) if needs_grad else None
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            s = _take(student, student_rows, start, stop).to(work)
            t = _take(teacher, teacher_rows, start, stop).to(device=student.device, dtype=work)
            rows, g = rows_loss_and_grad(s, t, kind, temperature, beta)
            w = weights[start:stop].to(work) if weights is not None else None
            total += (rows * w).sum() if w is not None else rows.sum()
            if needs_grad:
                grad[start:stop] = (g * w.unsqueeze(-1) if w is not None else g).to(grad.dtype)
        # Only the selected rows' gradient is kept; backward scatters it into the full logits.
        ctx.save_for_backward(grad, student_rows)
        ctx.student_shape = student.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad, rows = ctx.saved_tensors
        if grad is not None:
            grad = grad * grad_out.to(grad.dtype)
            if rows is not None:
                grad = grad.new_zeros(ctx.student_shape).index_copy_(0, rows, grad)
        return grad, None, None, None, None, None, None, None, None


def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: Divergence = "forward_kl",
                    temperature: float = 1.0, jsd_beta: float = 0.5, weights: torch.Tensor | None = None,
                    chunk_rows: int | None = None, student_rows: torch.Tensor | None = None,
                    teacher_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i · τ² · D(softmax(t_i/τ), softmax(s_i/τ)) over rows of `[..., V]` logits (a scalar, fp32;
    float64 for float64 inputs).

    `student_rows` / `teacher_rows` (given together) pick the compared rows, as indices into the logits
    flattened to `[N, V]`: chunks are gathered on the fly, so selecting positions costs no `[N, V]` copy
    and no scatter-add in backward. Without them, both tensors have the same shape and every row counts.
    `chunk_rows` (default: `auto_chunk_rows`) bounds the fp32 temporaries. The teacher side carries no
    gradient. Divide by your normaliser (token or sample count) outside.
    """
    if (student_rows is None) != (teacher_rows is None):
        raise ValueError("give student_rows and teacher_rows together")
    if student_rows is None and student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_rows is not None and (student_logits.shape[-1] != teacher_logits.shape[-1]
                                     or student_rows.shape != teacher_rows.shape):
        raise ValueError(f"row selection: student logits {tuple(student_logits.shape)} with "
                         f"{student_rows.numel()} rows vs teacher logits {tuple(teacher_logits.shape)} with "
                         f"{teacher_rows.numel()} rows")
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    w = weights.reshape(-1) if weights is not None else None
    chunk_rows = chunk_rows or auto_chunk_rows(s.shape[-1], s.device)
    return _ChunkedDivergence.apply(s, t, w, student_rows, teacher_rows, kind, float(temperature),
                                    float(jsd_beta), int(chunk_rows))


def reference_divergence(student_logits, teacher_logits, *, kind="forward_kl", temperature=1.0, jsd_beta=0.5):
    """Plain-autograd version of `divergence_loss` (per-row values); the test oracle."""
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if kind == "forward_kl":
        rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        rows = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        m = jsd_beta * log_pt.exp() + (1 - jsd_beta) * log_ps.exp()
        rows = jsd_beta * (log_pt.exp() * (log_pt - m.log())).sum(-1) + \
            (1 - jsd_beta) * (log_ps.exp() * (log_ps - m.log())).sum(-1)
    return rows * temperature ** 2


FEATURE_DISTANCES = ("mse", "smooth_l1", "cosine")


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", *,
                     beta: float = 1.0) -> torch.Tensor:
    """Per-vector distance over the last dimension (the teacher detached): mean squared error, mean SmoothL1
    (`beta`), or 1 - cosine. Shape: the inputs' leading dims."""
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    raise ValueError(f"unknown feature distance {kind!r}; choose one of {list(FEATURE_DISTANCES)}")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", *, beta: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean `feature_distance`; `mask` (broadcastable to the leading dims) restricts and normalises it."""
    per = feature_distance(student, teacher, kind, beta=beta)
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    while mask.dim() < per.dim():
        mask = mask.unsqueeze(-1)
    mask = mask.expand_as(per)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


class _TaskAndDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows_b, rows_t, targets, ce_weight, kd_slot, teacher_hidden, head, alpha, width, kind,
                temperature, jsd_beta, chunk_rows):
        compute = torch.promote_types(logits.dtype, torch.float32)
        # Only the supervised rows have a gradient: keep those rows, scatter them into the logits' shape in backward.
        grad = logits.new_empty((rows_b.shape[0], logits.shape[-1])) if ctx.needs_input_grad[0] else None
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
                every = chosen.numel() == slot.numel()  # the common case: no gather / scatter of rows
                teacher = head(teacher_hidden[slot if every else slot[chosen]])[:, :width]
                teacher = teacher.to(device=s.device, dtype=compute)
                rows, g_kd = rows_loss_and_grad(s[:, :width] if every else s[chosen, :width], teacher, kind,
                                                temperature, jsd_beta)
                kd_total += rows.sum()
                weighted += alpha * rows.sum()
                if g is not None and every:
                    g[:, :width].add_(g_kd, alpha=alpha)
                elif g is not None:
                    g[chosen, :width] += alpha * g_kd
            if grad is not None:
                grad[start:start + chunk_rows] = g
        ctx.save_for_backward(grad, rows_b, rows_t)
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(ce_total, kd_total)
        return weighted, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_weighted, _ce, _kd):
        grad, rows_b, rows_t = ctx.saved_tensors
        if grad is None:
            return (None,) * 14
        out = grad.new_zeros(ctx.logits_shape)
        out[rows_b, rows_t] = grad * grad_weighted.to(grad.dtype)
        return (out,) + (None,) * 13


def task_and_distill_sums(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor,
                          distilled: torch.Tensor, teacher_hidden: torch.Tensor | None,
                          head: Callable[[torch.Tensor], torch.Tensor], *, alpha: float, width: int, kind: str,
                          temperature: float, jsd_beta: float, chunk_rows: int):
    """(Σ w·CE + α·Σ KD, Σ CE, Σ KD) over the logit rows t with labels[t+1] supervised.

    `row_weight` `[B, T]`: CE weight per row; `distilled` `[B, T]`: rows with a KD term (a subset of the
    supervised rows), whose teacher hidden states `teacher_hidden` `[N_distilled, H]` come in row-major order;
    `head` maps a chunk of them to teacher logits (lingudistill: the teacher's LM head; kd: `teacher_hidden` holds
    row indices into already computed teacher logits and `head` gathers them). Only the first value carries a
    gradient (to `logits`)."""
    rows_b, rows_t = supervised_rows(labels).nonzero(as_tuple=True)
    is_kd = distilled[rows_b, rows_t]
    kd_slot = torch.where(is_kd, is_kd.long().cumsum(0) - 1, torch.full_like(rows_b, -1))
    if teacher_hidden is None:
        kd_slot = torch.full_like(rows_b, -1)
        teacher_hidden = logits.new_zeros(0, 1)
    return _TaskAndDistill.apply(logits, rows_b, rows_t, labels[rows_b, rows_t + 1], row_weight[rows_b, rows_t],
                                 kd_slot, teacher_hidden, head, float(alpha), int(width), kind, float(temperature),
                                 float(jsd_beta), int(chunk_rows))
