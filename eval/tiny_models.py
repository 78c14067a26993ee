"""Tiny, randomly initialised CLIP-family models, built from configs and never downloaded: the one factory per
family for the experiments, the benchmarks and the tests.

* `tiny_hf_clip(family)`: a transformers CLIPModel / AltCLIPModel / ChineseCLIPModel / SiglipModel;
* `tiny_open_clip(kind)`: an open_clip CLIP (ViT or ResNet image tower) from a custom architecture config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Literal

import torch

HFFamily = Literal["clip", "altclip", "chinese_clip", "siglip"]


def tiny_hf_clip(family: HFFamily = "clip", *, hidden: int = 32, layers: int = 2, heads: int = 2, patch: int = 8,
                 image_size: int = 32, vocab: int = 64, max_positions: int = 40, projection: int = 16,
                 text_hidden: int | None = None, eos_token_id: int = 3, pad_token_id: int = 0,
                 bos_token_id: int | None = None, text_config: dict | None = None, seed: int = 0):
    """A transformers CLIP-family model with small towers. A CLIP text tower pools at `eos_token_id`
    (`bos_token_id` defaults to the id below it); `text_config` sets further text-config fields."""
    import transformers as T

    text_hidden = text_hidden or hidden
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch)
    text = dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=layers,
                num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=max_positions,
                pad_token_id=pad_token_id)
    bos = eos_token_id - 1 if bos_token_id is None else bos_token_id
    per_family = {
        "clip": dict(eos_token_id=eos_token_id, bos_token_id=bos),
        "altclip": dict(project_dim=projection, max_position_embeddings=max_positions + 2),
        "chinese_clip": {},
        "siglip": dict(eos_token_id=eos_token_id),
    }
    if family not in per_family:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(per_family)}")
    text.update(per_family[family], **(text_config or {}))
    torch.manual_seed(seed)
    if family == "clip":
        return T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    if family == "altclip":
        return T.AltCLIPModel(T.AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    if family == "chinese_clip":
        return T.ChineseCLIPModel(T.ChineseCLIPConfig(text_config=text, vision_config=vision,
                                                      projection_dim=projection))
    return T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))


def open_clip_config(kind: Literal["vit", "resnet"] = "vit", *, width: int = 32, layers: int = 2, patch: int = 8,
                     image_size: int = 32, vocab: int = 64, context: int = 16, text_width: int | None = None,
                     embed_dim: int = 16) -> dict:
    """An open_clip architecture config (the dict `open_clip.add_model_config` reads from json)."""
    text_width = text_width or width
    if kind == "vit":
        vision = dict(image_size=image_size, layers=layers, width=width, patch_size=patch, head_width=width // 2)
    else:
        vision = dict(image_size=image_size, layers=[1, 1, 1, 1], width=width // 4, head_width=width // 2)
    return dict(embed_dim=embed_dim, vision_cfg=vision,
                text_cfg=dict(context_length=context, vocab_size=vocab, width=text_width, heads=2, layers=layers))


def tiny_open_clip(kind: Literal["vit", "resnet"] = "vit", *, seed: int = 0, name: str | None = None, **config):
    """(model, name): a randomly initialised open_clip CLIP from `open_clip_config(kind, **config)`, registered
    under `name` (default: one derived from the config) so `open_clip.create_model(name)` builds it again."""
    import open_clip

    from vlmdistill.eval.elevater.adapters import register_open_clip_config

    cfg = open_clip_config(kind, **config)
    name = name or f"dcclip-tiny-{kind}-{hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]}"
    register_open_clip_config(name, cfg)
    torch.manual_seed(seed)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning about random weights
    try:
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    finally:
        logging.getLogger().setLevel(previous)
    return model, name
