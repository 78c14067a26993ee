"""Training-only heads of CCD: the text segmentation head and the DINO projection head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import token_map


def _conv_norm_relu(conv: nn.Module, channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))


class SegmentationHead(nn.Module):
    """Text/background segmentation from several block outputs (the CCD "MLA" head).

    Per block map: LayerNorm -> conv3×3 -> conv1×1; concatenate; two ×2 transposed-conv upsamplings; a 2-class
    conv3×3. GroupNorm replaces the original BatchNorm so a sample's prediction does not depend on its batch.
    Output `[B, 2, H, W]` logits at the image size (bilinear resize when the patch is not 4).
    """

    def __init__(self, width: int, num_maps: int, hidden: int = 128, map_channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=1e-6) for _ in range(num_maps))
        self.reduce = nn.ModuleList(
            nn.Sequential(_conv_norm_relu(nn.Conv2d(width, hidden, 3, padding=1, bias=False), hidden, groups),
                          _conv_norm_relu(nn.Conv2d(hidden, map_channels, 1, bias=False), map_channels, groups))
            for _ in range(num_maps))
        self.up1 = _conv_norm_relu(nn.ConvTranspose2d(map_channels * num_maps, hidden, 4, 2, 1), hidden, groups)
        self.up2 = _conv_norm_relu(nn.ConvTranspose2d(hidden, hidden, 4, 2, 1), hidden, groups)
        self.classify = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, block_tokens: list[torch.Tensor], grid: tuple[int, int],
                image_size: tuple[int, int]) -> torch.Tensor:
        maps = [reduce(token_map(norm(tokens), grid))
                for tokens, norm, reduce in zip(block_tokens, self.norms, self.reduce)]
        x = self.classify(self.up2(self.up1(torch.cat(maps, dim=1))))
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return x


class DINOHead(nn.Module):
    """MLP (Linear-GELU-Linear-GELU-Linear) -> L2 norm -> weight-normalised prototypes, no bias (DINO, CCD).

    The prototype layer is `g · v / ‖v‖` per row; `norm_last_layer=True` fixes g = 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        direction = torch.empty(out_dim, bottleneck_dim)
        nn.init.kaiming_uniform_(direction, a=5 ** 0.5)  # nn.Linear's default initialisation
        self.last_direction = nn.Parameter(direction)
        self.last_gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def prototypes(self) -> torch.Tensor:
        return self.last_gain * F.normalize(self.last_direction, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ self.prototypes().t()
