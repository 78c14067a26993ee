"""Introspection of Hugging Face (and plain torch) models shared by the plugins."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .teachers import is_peft_model


def from_local_folder(cls, path: str, *, role: str, **kwargs: Any):
    """`cls.from_pretrained(path)` (a model, tokenizer or processor class) for a local folder only: nothing is
    downloaded and no Python shipped in the folder is run, whatever its config's `auto_map` says."""
    if not os.path.isdir(path):
        raise ConfigError(f"{role}: {path!r} is not a local folder (nothing is downloaded)")
    return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def loss_shifts_labels(model: nn.Module) -> bool:
    """True when the model's own loss is next-token CE (labels shifted by one), as the Trainer decides it."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    inner = base_model(model)
    config = getattr(inner, "config", None)
    loss_type = getattr(inner, "loss_type", None)
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False)


def forward_parameters(module: nn.Module) -> tuple[set[str], bool]:
    """(named forward parameters, whether it also takes **kwargs)."""
    params = inspect.signature(base_model(module).forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def filter_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep the keyword arguments `module.forward` names explicitly."""
    names, _ = forward_parameters(module)
    return {k: v for k, v in kwargs.items() if k in names}


def output_width(model: nn.Module) -> int | None:
    """Width of the logits: vocabulary for LMs, number of labels for classifiers; None if unknown."""
    inner = base_model(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Module) and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    config = getattr(inner, "config", None)
    if config is not None:
        name = type(inner).__name__
        if "Classification" in name and getattr(config, "num_labels", None):
            return int(config.num_labels)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "vocab_size", None) and ("ForCausalLM" in name or "ForConditionalGeneration" in name):
            return int(text.vocab_size)
    return None


def infer_width(module: nn.Module) -> int | None:
    """Last-dimension width of a module's output, from its structure (None if it cannot be told)."""
    for attr in ("out_features", "embedding_dim", "hidden_size", "embed_dim", "out_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]  # RMSNorm-style modules keep only a per-channel weight
    config = getattr(module, "config", None)
    if config is not None and isinstance(getattr(config, "hidden_size", None), int):
        return config.hidden_size
    return None
