"""The student as an ordinary CLIP model on disk.

transformers students use their own `save_pretrained` (plus the tokenizer, when given, so the folder
loads with `AutoModel` / `AutoTokenizer` alone). open_clip students are written in open_clip's
`local-dir:` layout — `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and
`open_clip_model.safetensors` — so `open_clip.create_model_and_transforms("local-dir:<dir>")` loads
them with no vlmdistill code.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from vlmdistill.errors import ConfigError, DataError
from vlmdistill.io import load_tensors, save_tensors, write_json

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


def open_clip_model_config(config: str | Mapping[str, Any]) -> dict:
    """An open_clip architecture config: a registered name (built-in or added) or the dict itself."""
    if isinstance(config, Mapping):
        cfg = dict(config)
    else:
        import open_clip

        cfg = open_clip.get_model_config(config)
        if cfg is None:
            raise ConfigError(f"unknown open_clip architecture {config!r}")
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ConfigError(f"open_clip config lacks {sorted(missing)}")
    return cfg


def save_open_clip(model: nn.Module, directory: str, config: str | Mapping[str, Any] | None = None,
                   preprocess: Mapping[str, Any] | None = None, state_dict: dict | None = None) -> None:
    """Weights always (`state_dict`, default the model's own); `open_clip_config.json` when the architecture
    config is known."""
    os.makedirs(directory, exist_ok=True)
    save_tensors(model.state_dict() if state_dict is None else state_dict, os.path.join(directory, OPEN_CLIP_WEIGHTS))
    if config is not None:
        visual = getattr(model, "visual", None)
        preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        preprocess_cfg.update(preprocess or {})
        write_json(os.path.join(directory, OPEN_CLIP_CONFIG),
                   {"model_cfg": open_clip_model_config(config), "preprocess_cfg": preprocess_cfg})


def load_open_clip_weights(model: nn.Module, directory: str) -> nn.Module:
    path = os.path.join(directory, OPEN_CLIP_WEIGHTS)
    if not os.path.isfile(path):
        raise DataError(f"{directory} holds no {OPEN_CLIP_WEIGHTS}")
    model.load_state_dict(load_tensors(path))
    return model


def save_tokenizer(tokenizer: Any, directory: str) -> None:
    """Write a transformers tokenizer beside the model (other tokenizers have no portable format)."""
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
