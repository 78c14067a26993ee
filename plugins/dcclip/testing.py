"""Tiny, randomly initialised CLIP-family models (built from configs, never downloaded) for the tests,
the demo and the benchmark."""

from __future__ import annotations

from typing import Literal

import torch

HFFamily = Literal["clip", "altclip", "chinese_clip", "siglip"]


def tiny_hf_clip(family: HFFamily = "clip", *, hidden: int = 32, layers: int = 2, heads: int = 2, patch: int = 8,
                 image_size: int = 32, vocab: int = 64, max_positions: int = 40, projection: int = 16,
                 text_hidden: int | None = None, eos_token_id: int = 3, pad_token_id: int = 0, seed: int = 0):
    """A transformers CLIPModel / AltCLIPModel / ChineseCLIPModel / SiglipModel with small towers."""
    import transformers as T

    text_hidden = text_hidden or hidden
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch)
    text = dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=layers,
                num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=max_positions,
                pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    if family == "clip":
        text.update(eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1)
        return T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    if family == "altclip":
        text.update(project_dim=projection, max_position_embeddings=max_positions + 2)
        return T.AltCLIPModel(T.AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    if family == "chinese_clip":
        return T.ChineseCLIPModel(T.ChineseCLIPConfig(text_config=text, vision_config=vision,
                                                      projection_dim=projection))
    if family == "siglip":
        text.update(eos_token_id=eos_token_id)
        return T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))
    raise ValueError(f"unknown family {family!r}")


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


def register_open_clip_config(name: str, config: dict) -> str:
    """Make a custom architecture creatable by name (`open_clip.create_model(name)`)."""
    import open_clip

    open_clip.factory._MODEL_CONFIGS[name] = dict(config)  # what add_model_config does for a json file
    return name


def tiny_open_clip(kind: Literal["vit", "resnet"] = "vit", *, seed: int = 0, name: str | None = None, **config):
    """A randomly initialised open_clip CLIP from a custom config registered under `name`."""
    import logging

    import open_clip

    cfg = open_clip_config(kind, **config)
    import hashlib
    import json

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


def token_batch(n: int, length: int = 9, vocab: int = 64, *, seed: int = 0, eos: int = 3, bos: int = 2,
                min_length: int = 4) -> dict[str, torch.Tensor]:
    """Right-padded token ids (pad 0) with bos/eos and varying lengths, plus the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(min_length, length + 1, (1,), generator=g))
        ids[i, :k] = torch.randint(eos + 1, vocab, (k,), generator=g)
        ids[i, 0], ids[i, k - 1] = bos, eos
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}
