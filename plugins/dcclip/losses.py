"""DC-CLIP losses: stage-1 feature distillation terms and the stage-2 symmetric InfoNCE.

Every stage-1 term returns one value per sample, so a micro-batch loss is a mean over samples and
k equal micro-batches (or DDP ranks) average to the loss of the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.distributed import gather_rows
from vlmdistill.losses import feature_distance


def adapt_map(student_map: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """A 1x1 adapter on a `[B, C, h, w]` map: a Conv2d directly, a Linear over the channel axis."""
    if isinstance(adapter, nn.Conv2d):
        return adapter(student_map)
    return adapter(student_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def align_maps(student_map: torch.Tensor, teacher_map: torch.Tensor, how: str,
               mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring both maps onto one grid: the student's resized to the teacher's, or the teacher's pooled."""
    if student_map.shape[-2:] == teacher_map.shape[-2:]:
        return student_map, teacher_map
    if how == "interpolate":
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(student_map, size=teacher_map.shape[-2:], mode=mode, **kwargs), teacher_map
    if how == "pool":
        return student_map, F.adaptive_avg_pool2d(teacher_map, student_map.shape[-2:])
    raise ValueError(f"unknown spatial alignment {how!r}; choose 'interpolate' or 'pool'")


def image_map_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, adapter: nn.Module, *, kind: str,
                   beta: float = 1.0, align: str = "interpolate", mode: str = "bilinear") -> torch.Tensor:
    """Per-sample `[B]`: mean over grid positions of the distance between the adapted student map and
    the teacher map at each position."""
    adapted = adapt_map(student_map, adapter)
    s, t = align_maps(adapted, teacher_map.to(adapted.device), align, mode)
    s = s.flatten(2).transpose(1, 2)  # [B, hw, C]
    t = t.flatten(2).transpose(1, 2)
    return feature_distance(s, t, kind, beta=beta).mean(dim=1)


def text_token_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, mask: torch.Tensor,
                    adapter: nn.Module, *, kind: str, beta: float = 1.0,
                    normalisation: str = "per_sample") -> torch.Tensor:
    """Token-state loss over non-padding tokens. 'per_sample': `[B]`, each sample's masked mean;
    'per_token': a `[1]` tensor, the masked mean over the whole micro-batch."""
    length = min(student_tokens.shape[1], teacher_tokens.shape[1], mask.shape[1])
    s = adapter(student_tokens[:, :length])
    t = teacher_tokens[:, :length].to(s.device)
    m = mask[:, :length].to(s.device, s.dtype)
    per_token = feature_distance(s, t, kind, beta=beta) * m
    if normalisation == "per_token":
        return (per_token.sum() / m.sum().clamp_min(1.0)).reshape(1)
    if normalisation != "per_sample":
        raise ValueError(f"unknown text normalisation {normalisation!r}")
    return per_token.sum(1) / m.sum(1).clamp_min(1.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, adapter: nn.Module | None, *, kind: str,
                   beta: float = 1.0) -> torch.Tensor:
    """Per-sample `[B]` distance between (adapted) student and teacher embeddings."""
    if adapter is not None:
        student = adapter(student)
    return feature_distance(student, teacher.to(student.device), kind, beta=beta)


# ------------------------------------------------------------------------ stage 2

def symmetric_info_nce(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, *,
                       max_scale: float = 100.0, gather: bool = True) -> torch.Tensor:
    """L = 1/2 (CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)) with s = exp(logit_scale) clamped at `max_scale`.

    With `gather`, negatives come from every DDP rank; each rank computes the loss of the global
    batch, and DDP's gradient average then equals the single-process gradient.
    """
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    if gather:
        (image, _), (text, _) = gather_rows(image, differentiable=True), gather_rows(text, differentiable=True)
    scale = logit_scale.float().exp().clamp(max=max_scale)
    logits = scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
