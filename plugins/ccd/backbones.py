"""Where CCD reads a ViT's features: the built-in CCD ViT, a transformers ViT/DeiT (e.g. a TrOCR encoder) or a
timm VisionTransformer. Features are captured with forward hooks on the final norm and on block outputs, so the
user's model is called unchanged."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vlmdistill.errors import UnsupportedModelError

from .vit import CCDViT

_BLOCK_LISTS = ("blocks", "layers", "encoder.layer", "encoder.layers")
_FINAL_NORMS = ("norm", "layernorm")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    kind: str                   # "ccd_vit" | "transformers" | "timm"
    input_name: str             # keyword of the image tensor in forward()
    patch_size: tuple[int, int]
    width: int
    depth: int
    block_prefix: str           # "blocks" -> blocks.0, blocks.1, ...
    final_norm: str             # module whose output holds the final tokens

    def block_path(self, block: int) -> str:
        """Module path of 1-based block `block`."""
        return f"{self.block_prefix}.{block - 1}"

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def describe_backbone(model: nn.Module) -> BackboneSpec:
    """Find the blocks, final norm, patch size and width of a supported ViT, or say what is missing."""
    if isinstance(model, CCDViT):
        cfg = model.config
        return BackboneSpec("ccd_vit", "pixel_values", (cfg.patch_size, cfg.patch_size), cfg.embed_dim, cfg.depth,
                            "blocks", "norm")
    block_prefix = next((p for p in _BLOCK_LISTS
                         if isinstance(_submodule(model, p), (nn.ModuleList, nn.Sequential))), None)
    final_norm = next((p for p in _FINAL_NORMS if _submodule(model, p) is not None), None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "patch_size") and hasattr(config, "hidden_size"):
        kind, input_name = "transformers", "pixel_values"
        patch, width = _pair(config.patch_size), int(config.hidden_size)
    elif hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        kind, input_name = "timm", "x"
        patch, width = _pair(model.patch_embed.patch_size), int(model.embed_dim)
    else:
        raise UnsupportedModelError(
            f"ccd needs a ViT: the built-in CCDViT (vlmdistill.plugins.ccd.ccd_vit), a transformers ViTModel/DeiTModel "
            f"(e.g. a TrOCR encoder) or a timm VisionTransformer; got {type(model).__name__}")
    if block_prefix is None or final_norm is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: ccd did not find its transformer blocks (looked for {list(_BLOCK_LISTS)}) or its "
            f"final norm (looked for {list(_FINAL_NORMS)}); pass the vision encoder itself, e.g. model.encoder of a "
            "VisionEncoderDecoderModel")
    depth = len(model.get_submodule(block_prefix))
    return BackboneSpec(kind, input_name, patch, width, depth, block_prefix, final_norm)


def patch_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Drop leading CLS / distillation / register tokens: `[B, T, E]` -> `[B, gh*gw, E]`."""
    n = grid[0] * grid[1]
    prefix = tokens.shape[1] - n
    if prefix < 0:
        raise UnsupportedModelError(f"the backbone produced {tokens.shape[1]} tokens, fewer than the "
                                    f"{grid[0]}x{grid[1]} patch grid")
    return tokens[:, prefix:]


def token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[B, gh*gw, E]` patch tokens -> `[B, E, gh, gw]`."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])
