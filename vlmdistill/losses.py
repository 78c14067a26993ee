"""Distillation losses over logit rows.

`divergence_loss` computes Σ_rows D(p_teacher, p_student) for forward KL, reverse KL or JSD(β) at
temperature τ (scaled by τ², Hinton et al.). It runs chunk by chunk and computes the gradient with
respect to the student logits in the same pass (Liger-style), so the fp32 softmax / log-softmax
intermediates of a `[N, V]` problem are never held all at once: the only `[N, V]`-sized tensor kept
for backward is the gradient, in the student's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


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


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weights, kind, temperature, beta, chunk_rows):
        needs_grad = ctx.needs_input_grad[0]
        # fp32 at least (bf16/fp16 inputs), float64 kept for float64 inputs (reference checks).
        work = torch.float64 if student.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=work, device=student.device)
        grad = torch.empty_like(student) if needs_grad else None
        for start in range(0, student.shape[0], chunk_rows):
            stop = min(start + chunk_rows, student.shape[0])
            s = student[start:stop].to(work)
            t = teacher[start:stop].to(device=student.device, dtype=work)
            rows, g = rows_loss_and_grad(s, t, kind, temperature, beta)
            w = weights[start:stop].to(work) if weights is not None else None
            total += (rows * w).sum() if w is not None else rows.sum()
            if needs_grad:
                grad[start:stop] = (g * w.unsqueeze(-1) if w is not None else g).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad * grad_out.to(grad.dtype) if grad is not None else None
        return g, None, None, None, None, None, None


def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: Divergence = "forward_kl",
                    temperature: float = 1.0, jsd_beta: float = 0.5, weights: torch.Tensor | None = None,
                    chunk_rows: int = 1024) -> torch.Tensor:
    """Σ_i w_i · τ² · D(softmax(t_i/τ), softmax(s_i/τ)) over rows of `[N, V]` logits (a scalar, fp32;
    float64 for float64 inputs).

    The teacher side carries no gradient. Divide by your normaliser (token or sample count) outside.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    w = weights.reshape(-1) if weights is not None else None
    return _ChunkedDivergence.apply(s, t, w, kind, float(temperature), float(jsd_beta), int(chunk_rows))


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


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", *, beta: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean feature-matching loss; `mask` (broadcastable to the leading dims) restricts and normalises it."""
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        per = (student - teacher).pow(2).mean(-1)
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).mean(-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"unknown feature loss {kind!r}; choose one of ['mse', 'smooth_l1', 'cosine']")
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    while mask.dim() < per.dim():
        mask = mask.unsqueeze(-1)
    mask = mask.expand_as(per)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)
