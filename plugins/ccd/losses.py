"""CCD's losses, the teacher centre and the EMA momentum schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmdistill.distributed import all_reduce_sum


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean 2-class cross-entropy of `[B, 2, H, W]` logits against `[B, H, W]` text masks.

    One softmax: `cross_entropy` takes the logits. (The original code passes softmax probabilities into
    `cross_entropy`, a second softmax that flattens the loss and its gradient.)
    """
    return F.cross_entropy(logits.float(), target.long())


def cross_view_distillation_loss(student_regular: torch.Tensor, student_irregular: torch.Tensor,
                                 teacher_regular: torch.Tensor, teacher_irregular: torch.Tensor,
                                 center: torch.Tensor, sample_index: torch.Tensor, batch_size: int, *,
                                 student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """½[H(P_t(R_k), P_s(I_k)) + H(P_t(I_k), P_s(R_k))] per paired character k (rows), averaged per image,
    then summed over images and divided by `batch_size`.

    Averaging per image (rather than over all characters of the batch) keeps the loss a sum over samples, so
    k micro-batches give exactly the gradient of one batch k times larger; images without characters add 0.
    """
    if student_regular.shape[0] == 0:
        return student_regular.sum() * 0.0
    t_reg = F.softmax((teacher_regular.float() - center) / teacher_temperature, dim=-1)
    t_irr = F.softmax((teacher_irregular.float() - center) / teacher_temperature, dim=-1)
    s_reg = F.log_softmax(student_regular.float() / student_temperature, dim=-1)
    s_irr = F.log_softmax(student_irregular.float() / student_temperature, dim=-1)
    per_char = -0.5 * ((t_reg * s_irr).sum(-1) + (t_irr * s_reg).sum(-1))
    counts = torch.bincount(sample_index, minlength=batch_size).to(per_char.dtype)
    per_image = torch.zeros(batch_size, dtype=per_char.dtype, device=per_char.device).index_add(0, sample_index,
                                                                                                  per_char)
    return (per_image / counts.clamp_min(1)).sum() / batch_size


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, sample_index: torch.Tensor,
                    batch_size: int, teacher_temperature: float) -> torch.Tensor:
    """Collapse monitor: entropy (nats) of the centred, sharpened teacher distribution, averaged like the loss
    (over an image's characters, both views, then over images; an image without characters adds 0). It tends to
    ln(out_dim) when the teacher flattens to uniform outputs and to 0 when every character gets one prototype."""
    if teacher_logits.shape[0] == 0:
        return teacher_logits.new_zeros(())
    p = F.log_softmax((teacher_logits.float() - center) / teacher_temperature, dim=-1)
    per_output = -(p.exp() * p).sum(-1)
    n = sample_index.shape[0]
    per_char = 0.5 * (per_output[:n] + per_output[n:])
    counts = torch.bincount(sample_index, minlength=batch_size).to(per_char.dtype)
    per_image = torch.zeros(batch_size, dtype=per_char.dtype, device=per_char.device).index_add(0, sample_index,
                                                                                                  per_char)
    return (per_image / counts.clamp_min(1)).sum() / batch_size


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """Cosine schedule from `base` at step 0 to 1 at `total_steps` (and after)."""
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class TeacherCentre:
    """DINO's centre c ← m·c + (1−m)·mean(teacher outputs), with the mean taken over one optimizer step.

    Teacher outputs are summed as micro-batches arrive (`observe`) and the centre moves once per optimizer
    step (`update`, all-reducing sum and count across processes), so k micro-batches or a DDP group update it
    exactly as one batch of the same total size would. Within a step every micro-batch sees the same centre.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.value = torch.zeros(dim, device=device)
        self.pending_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.pending_count = torch.zeros((), dtype=torch.float64, device=device)

    def to(self, device: torch.device) -> None:
        if self.value.device == torch.device(device):
            return
        self.value = self.value.to(device)
        self.pending_sum = self.pending_sum.to(device)
        self.pending_count = self.pending_count.to(device)

    @torch.no_grad()
    def observe(self, teacher_outputs: torch.Tensor) -> None:
        self.pending_sum += teacher_outputs.detach().double().sum(0)
        self.pending_count += teacher_outputs.shape[0]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        total = torch.cat([self.pending_sum, self.pending_count.view(1)])
        all_reduce_sum(total)
        count = float(total[-1])
        if count > 0:
            mean = (total[:-1] / count).to(self.value.dtype)
            self.value.mul_(momentum).add_(mean, alpha=1.0 - momentum)
        self.discard()

    def discard(self) -> None:
        """Forget the outputs observed since the last update (a step the optimizer skipped)."""
        self.pending_sum.zero_()
        self.pending_count.zero_()
