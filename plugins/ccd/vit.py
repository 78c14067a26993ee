"""The CCD backbone: a ViT for 32×128 text images with 4×4 patches (8×32 = 256 tokens), a learned position
embedding and no CLS token. Sizes from the CCD code: tiny 192/3 heads, small 384/6, "base" 512/8, depth 12.

It saves and loads like a transformers model (`save_pretrained` / `from_pretrained`: `config.json` +
`model.safetensors`), so vlmdistill's generic student I/O handles it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from vlmdistill.io import load_tensors, save_tensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "ccd_vit"

PRESETS = {
    "tiny": {"embed_dim": 192, "num_heads": 3},
    "small": {"embed_dim": 384, "num_heads": 6},
    "base": {"embed_dim": 512, "num_heads": 8},
}


@dataclasses.dataclass
class CCDViTConfig:
    image_size: tuple[int, int] = (32, 128)
    patch_size: int = 4
    in_channels: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)
        if any(v % self.patch_size for v in self.image_size):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


@dataclasses.dataclass
class CCDViTOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class CCDViT(nn.Module):
    """`forward(pixel_values) -> CCDViTOutput(last_hidden_state=[B, 256, E])` (final LayerNorm applied)."""

    main_input_name = "pixel_values"

    def __init__(self, config: CCDViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = dataclasses.replace(config or CCDViTConfig(), **overrides)
        self.config = config
        gh, gw = config.grid
        self.patch_embed = nn.Conv2d(config.in_channels, config.embed_dim, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, config.embed_dim))
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, config.qkv_bias, rates[i],
                  config.layer_norm_eps) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def forward(self, pixel_values: torch.Tensor) -> CCDViTOutput:
        if tuple(pixel_values.shape[-2:]) != self.config.image_size:
            raise ValueError(f"CCDViT expects {self.config.image_size} images, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return CCDViTOutput(last_hidden_state=self.norm(x))

    # ------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                        is_main_process: bool = True) -> None:
        """config.json + model.safetensors; `is_main_process=False` (a Trainer rank that must not save) writes
        nothing."""
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        payload = {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)}
        with open(os.path.join(directory, CONFIG_NAME), "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        save_tensors(self.state_dict() if state_dict is None else state_dict, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype | None = None, **overrides: Any) -> "CCDViT":
        with open(os.path.join(directory, CONFIG_NAME)) as fh:
            payload = json.load(fh)
        if payload.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{directory} does not hold a CCDViT (config.json model_type is not {MODEL_TYPE!r})")
        model = cls(CCDViTConfig(**{**payload, **overrides}))
        model.load_state_dict(load_tensors(os.path.join(directory, WEIGHTS_NAME)))
        return model.to(dtype) if dtype is not None else model


def ccd_vit(size: str = "small", **overrides: Any) -> CCDViT:
    """A CCD ViT preset (`tiny`, `small`, `base`); keyword arguments override `CCDViTConfig` fields."""
    if size not in PRESETS:
        raise ValueError(f"unknown CCD ViT size {size!r}; choose one of {sorted(PRESETS)}")
    return CCDViT(CCDViTConfig(**{**PRESETS[size], **overrides}))
