"""What DC-CLIP needs to know about a CLIP-style model, per family.

A `ClipModelSpec` says which submodule holds the last-layer image tokens (or feature map) and text
token states, their widths, how the model is called, and where its normalised embeddings come out.
The taps are the points Hugging Face models return as `last_hidden_state`, and the equivalent
points of open_clip towers:

| family | image tap | text tap |
|---|---|---|
| HF CLIP / AltCLIP / ChineseCLIP | `vision_model.encoder` (class token dropped) | CLIP: `text_model.final_layer_norm`; AltCLIP: `text_model.pre_LN`; ChineseCLIP: `text_model.encoder` |
| HF SigLIP | `vision_model.post_layernorm` (no class token) | `text_model.final_layer_norm` |
| open_clip ViT | `visual.transformer` (class token dropped) | `ln_final` (`text.ln_final` for custom text towers) |
| open_clip ResNet | `visual.layer4` (a feature map) | as above |
| HF VisionTextDualEncoder | `vision_model` (its `last_hidden_state`; leading tokens beyond the patch grid dropped) | `text_model` (its `last_hidden_state`) |

Anything else needs `TowerTaps` overrides or is refused with `UnsupportedModelError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hf import base_model
from vlmdistill.hooks import get_submodule

from .config import TowerTaps

HF_FAMILIES = ("clip", "altclip", "chinese_clip", "siglip")
DUAL_ENCODER = "vision-text-dual-encoder"
_HF_TEXT_TAP = {"clip": "text_model.final_layer_norm", "altclip": "text_model.pre_LN",
                "chinese_clip": "text_model.encoder", "siglip": "text_model.final_layer_norm"}
_HF_IMAGE_TAP = {"clip": ("vision_model.encoder", 1), "altclip": ("vision_model.encoder", 1),
                 "chinese_clip": ("vision_model.encoder", 1), "siglip": ("vision_model.post_layernorm", 0)}
SUPPORTED = ("transformers CLIPModel, AltCLIPModel, ChineseCLIPModel, SiglipModel, VisionTextDualEncoderModel; "
             "open_clip CLIP / CustomTextCLIP with a VisionTransformer or ModifiedResNet image tower")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclasses.dataclass
class ClipModelSpec:
    family: str                     # "hf:clip", "open_clip:vit", ...
    image_module: str
    image_prefix_tokens: Optional[int]  # None: whatever precedes the patch grid (the grid follows from patch_size)
    image_dim: int
    text_module: str
    text_dim: int
    embed_dim: int
    image_size: tuple[int, int]     # the input resolution the model expects
    patch_size: Optional[tuple[int, int]]  # None for feature-map towers
    vocab_size: Optional[int]
    pad_id: Optional[int]           # open_clip: id that pads token sequences

    @property
    def is_open_clip(self) -> bool:
        return self.family.startswith("open_clip")

    # ----------------------------------------------------------- inputs
    @property
    def input_names(self) -> tuple[str, str, Optional[str]]:
        """Batch keys of (pixels, token ids, attention mask) for this model's forward."""
        return ("image", "text", None) if self.is_open_clip else ("pixel_values", "input_ids", "attention_mask")

    def canonical(self, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                          torch.Tensor | None]:
        """(pixels, ids, mask) out of a batch in this model's own key names; mask is bool [B, L]."""
        pix_key, ids_key, mask_key = self.input_names
        pixels, ids = inputs.get(pix_key), inputs.get(ids_key)
        mask = inputs.get(mask_key) if mask_key else None
        if ids is not None:
            mask = mask.bool() if mask is not None else self.derive_mask(ids)
        return pixels, ids, mask

    def derive_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Valid positions when the model takes no mask: everything up to the last non-padding token
        (a pad id inside a caption, e.g. open_clip's '!' = 0, still counts)."""
        if self.pad_id is None:
            return torch.ones_like(ids, dtype=torch.bool)
        positions = torch.arange(ids.shape[1], device=ids.device)
        non_pad = ids != self.pad_id
        last = torch.where(non_pad, positions, torch.full_like(ids, -1)).amax(dim=1, keepdim=True)
        return positions.unsqueeze(0) <= last

    def call_inputs(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """Keyword arguments of a forward running both towers."""
        if self.is_open_clip:
            return {"image": pixels, "text": ids}
        out = {"pixel_values": pixels, "input_ids": ids}
        if mask is not None:
            out["attention_mask"] = mask.long()
        return out

    # ---------------------------------------------------------- outputs
    def embeddings(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds, text_embeds), L2-normalised, from the model's forward output."""
        if isinstance(output, dict) and "image_features" in output:
            return output["image_features"], output["text_features"]
        if isinstance(output, (tuple, list)):
            return output[0], output[1]
        image, text = getattr(output, "image_embeds", None), getattr(output, "text_embeds", None)
        if image is None or text is None:
            raise UnsupportedModelError(f"{self.family}: the forward output {type(output).__name__} has no "
                                        "image/text embeddings")
        return image, text

    def image_map(self, captured: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The captured image output as a `[B, C, h, w]` map (tokens are laid back onto their grid)."""
        if captured.dim() == 4:
            return captured
        if captured.dim() != 3 or captured.shape[0] != pixels.shape[0]:
            raise UnsupportedModelError(f"{self.family}: image tap {self.image_module!r} gave shape "
                                        f"{tuple(captured.shape)}; expected [B, tokens, width] or [B, C, H, W]")
        if self.patch_size is not None:
            h, w = pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1]
        else:
            h = w = None
        prefix = self.image_prefix_tokens
        if prefix is None:
            prefix = captured.shape[1] - h * w if h is not None else 0
            if prefix < 0:
                raise UnsupportedModelError(f"{self.family}: image tap {self.image_module!r} gave {captured.shape[1]} "
                                            f"tokens, fewer than the {h}x{w} patch grid; set image_prefix_tokens")
        tokens = captured[:, prefix:]
        n = tokens.shape[1]
        if h is None:
            h = w = int(math.isqrt(n))
        if h * w != n:
            side = math.isqrt(n)
            if side * side != n:
                raise UnsupportedModelError(f"{self.family}: {n} image tokens do not form a grid for input "
                                            f"{tuple(pixels.shape[-2:])}; set image_prefix_tokens in the taps")
            h = w = side
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def logit_scale(self, model: nn.Module) -> Optional[nn.Parameter]:
        scale = getattr(base_model(model), "logit_scale", None)
        return scale if isinstance(scale, nn.Parameter) else None

    def fingerprint_fields(self) -> dict[str, Any]:
        return {"family": self.family, "image_module": self.image_module,
                "image_prefix_tokens": self.image_prefix_tokens, "text_module": self.text_module}


def _hf_spec(model: nn.Module, family: str) -> ClipModelSpec:
    config = model.config
    vision, text = config.vision_config, config.text_config
    image_module, prefix = _HF_IMAGE_TAP[family]
    projection = getattr(model, "visual_projection", None)
    embed_dim = projection.out_features if isinstance(projection, nn.Linear) else vision.hidden_size
    return ClipModelSpec(family=f"hf:{family}", image_module=image_module, image_prefix_tokens=prefix,
                         image_dim=vision.hidden_size, text_module=_HF_TEXT_TAP[family], text_dim=text.hidden_size,
                         embed_dim=embed_dim, image_size=_pair(vision.image_size), patch_size=_pair(vision.patch_size),
                         vocab_size=getattr(text, "vocab_size", None), pad_id=getattr(text, "pad_token_id", None))


def _dual_encoder_spec(model: nn.Module) -> ClipModelSpec:
    """`VisionTextDualEncoderModel`: any transformers vision tower and text tower, each read at its
    `last_hidden_state` (the tower's own output), so any pairing works without knowing its internals."""
    config = model.config
    vision, text = config.vision_config, config.text_config
    patch = getattr(vision, "patch_size", None)
    image_dim = getattr(vision, "hidden_size", None) or (getattr(vision, "hidden_sizes", None) or [0])[-1]
    return ClipModelSpec(family=f"hf:{DUAL_ENCODER}", image_module="vision_model", image_prefix_tokens=None,
                         image_dim=int(image_dim), text_module="text_model", text_dim=text.hidden_size,
                         embed_dim=int(config.projection_dim), image_size=_pair(vision.image_size),
                         patch_size=_pair(patch) if patch is not None else None,
                         vocab_size=getattr(text, "vocab_size", None), pad_id=getattr(text, "pad_token_id", None))


def _open_clip_spec(model: nn.Module) -> ClipModelSpec:
    visual = model.visual
    kind = type(visual).__name__
    if kind == "VisionTransformer":
        image = dict(image_module="visual.transformer", image_prefix_tokens=1, image_dim=visual.transformer.width,
                     patch_size=_pair(visual.patch_size), family="open_clip:vit")
    elif kind == "ModifiedResNet":
        image = dict(image_module="visual.layer4", image_prefix_tokens=0,
                     image_dim=int(visual.attnpool.positional_embedding.shape[1]), patch_size=None,
                     family="open_clip:resnet")
    else:
        image = dict(image_module="", image_prefix_tokens=0, image_dim=0, patch_size=None,
                     family=f"open_clip:{kind}")
    text_tower = getattr(model, "text", None)
    if text_tower is None:  # built-in CLIP: the text tower's parts sit on the model itself
        text = dict(text_module="ln_final", text_dim=model.transformer.width,
                    vocab_size=model.token_embedding.num_embeddings, pad_id=0)
    elif type(text_tower).__name__ == "TextTransformer":
        text = dict(text_module="text.ln_final", text_dim=text_tower.transformer.width,
                    vocab_size=text_tower.token_embedding.num_embeddings, pad_id=getattr(text_tower, "pad_id", 0))
    elif type(text_tower).__name__ == "HFTextEncoder":
        hf_config = text_tower.transformer.config
        text = dict(text_module="text.transformer", text_dim=hf_config.hidden_size, vocab_size=hf_config.vocab_size,
                    pad_id=getattr(hf_config, "pad_token_id", None))
    else:
        text = dict(text_module="", text_dim=0, vocab_size=None, pad_id=0)
    return ClipModelSpec(embed_dim=int(visual.output_dim), image_size=_pair(visual.image_size), **image, **text)


def describe_model(model: nn.Module, taps: TowerTaps | None = None, *, role: str = "model") -> ClipModelSpec:
    """The spec of `model` with `taps` overrides applied; raises `UnsupportedModelError` for other models."""
    inner = base_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type in HF_FAMILIES and hasattr(inner, "vision_model") and hasattr(inner, "text_model"):
        spec = _hf_spec(inner, model_type)
    elif model_type == DUAL_ENCODER and hasattr(inner, "vision_model") and hasattr(inner, "text_model"):
        spec = _dual_encoder_spec(inner)
    elif type(inner).__module__.startswith("open_clip") and hasattr(inner, "visual") and hasattr(inner, "encode_text"):
        spec = _open_clip_spec(inner)
    else:
        what = f"model_type {model_type!r}" if model_type else type(inner).__name__
        raise UnsupportedModelError(f"dcclip: the {role} ({what}) is not a supported CLIP-style model. "
                                    f"Supported: {SUPPORTED}")
    taps = taps or TowerTaps()
    overrides = {k: v for k, v in dataclasses.asdict(taps).items() if v is not None}
    spec = dataclasses.replace(spec, **overrides)
    if not spec.image_module or not spec.image_dim:
        raise UnsupportedModelError(f"dcclip: the {role}'s image tower ({spec.family}) has no known feature tap; "
                                    f"set {role}_taps.image_module, image_dim and image_prefix_tokens")
    if not spec.text_module or not spec.text_dim:
        raise UnsupportedModelError(f"dcclip: the {role}'s text tower ({spec.family}) has no known feature tap; "
                                    f"set {role}_taps.text_module and text_dim")
    for path in (spec.image_module, spec.text_module):
        get_submodule(inner, path, role=role)
    return spec
