"""The soft-target contrastive loss of momentum distillation (ALBEF's ITC with a momentum teacher).

Student queries are compared with teacher keys: the macro-batch's teacher embeddings of the other
modality followed by that modality's queue. The target row of sample i is

    alpha * softmax(teacher_i · keys / tau) + (1 - alpha) * onehot(column of i)

where teacher_i is the teacher embedding of the same sample in the query's modality, i.e. the key
row of sample i in the other direction. Keys carry no gradient, so the loss of a micro-batch depends
only on its own student forward: micro-batches of one macro-batch can be back-propagated one at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_targets(teacher_queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, alpha: float,
                 logit_scale: torch.Tensor | float) -> torch.Tensor:
    """`[n, C]` target distributions; `keys` is `[C, D]`, `positives` the column of each row's own pair."""
    with torch.no_grad():
        one_hot = F.one_hot(positives, keys.shape[0]).to(keys.dtype)
        if alpha == 0.0:
            return one_hot
        scale = logit_scale.detach() if isinstance(logit_scale, torch.Tensor) else logit_scale
        teacher = F.softmax(teacher_queries @ keys.T * scale, dim=-1)
        return alpha * teacher + (1.0 - alpha) * one_hot


def soft_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def momentum_contrastive_rows(image_queries: torch.Tensor, text_queries: torch.Tensor, image_keys: torch.Tensor,
                              text_keys: torch.Tensor, positives: torch.Tensor, *, alpha: float,
                              logit_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row image→text and text→image losses of one micro-batch.

    image_queries, text_queries: `[n, D]` L2-normalised student embeddings (with gradient).
    image_keys, text_keys: `[C, D]` L2-normalised teacher keys: macro-batch rows first, then the queue.
    positives: `[n]` column of each row's own pair (its index in the macro-batch).
    logit_scale: 1 / temperature (a tensor keeps its gradient on the student side).
    """
    image_keys, text_keys = image_keys.detach(), text_keys.detach()
    i2t_targets = soft_targets(image_keys[positives], text_keys, positives, alpha, logit_scale)
    t2i_targets = soft_targets(text_keys[positives], image_keys, positives, alpha, logit_scale)
    i2t = soft_cross_entropy_rows(image_queries @ text_keys.T * logit_scale, i2t_targets)
    t2i = soft_cross_entropy_rows(text_queries @ image_keys.T * logit_scale, t2i_targets)
    return i2t, t2i
