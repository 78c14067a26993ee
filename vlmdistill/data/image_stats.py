"""The per-channel image statistics models are trained with, and the normalisation by them (one copy for all)."""

from __future__ import annotations

from typing import Sequence

import torch

#: OpenAI CLIP's (also AltCLIP's and Chinese-CLIP's) pixel mean and std
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: ImageNet's, the usual choice of ViTs and text recognisers
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: SigLIP's mean and std (both 0.5)
HALF_MEAN_STD = (0.5, 0.5, 0.5)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`[N, 3, H, W]` in [0, 1] -> `(images - mean) / std`, per channel."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def unnormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The inverse of `normalise`: back to [0, 1] units."""
    return pixels * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
