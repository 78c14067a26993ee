"""The CCD teacher as the encoder for downstream use: a trainable copy, or its folder in the student's format."""

from __future__ import annotations

import copy
import os

from torch import nn


def _plugin_of(wrapped: nn.Module):
    model = wrapped  # peel DDP / accelerate wrappers
    while not hasattr(model, "plugin") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    plugin = getattr(model, "plugin", None)
    if plugin is None or getattr(plugin, "name", None) != "ccd":
        raise TypeError(f"expected a model returned by vlmdistill.wrap(..., plugin='ccd'), "
                        f"got {type(wrapped).__name__}")
    return plugin


def teacher_encoder(wrapped: nn.Module) -> nn.Module:
    """A trainable copy of the EMA teacher backbone: the encoder to initialise a recogniser from."""
    encoder = copy.deepcopy(_plugin_of(wrapped).teacher)
    encoder.requires_grad_(True)
    return encoder.train()


def export_teacher_encoder(wrapped: nn.Module, directory: str) -> str:
    """Write the EMA teacher backbone in the student's native format (`save_pretrained` for transformers and
    CCD ViTs, `model.safetensors` otherwise) and return `directory`. It loads like the student class:
    `CCDViT.from_pretrained(directory)`, `ViTModel.from_pretrained(directory)`."""
    from vlmdistill.io import save_student

    os.makedirs(directory, exist_ok=True)
    save_student(_plugin_of(wrapped).teacher, directory)
    return directory
