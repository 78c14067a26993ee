"""Per-tower features of one forward, read through forward hooks.

`TowerFeatures` is the common currency of the live teacher, the teacher-feature cache and the
student: an image map `[B, C, h, w]`, text token states `[B, L, D]` with their mask, and the two
L2-normalised projected embeddings. Whatever produced them, the stage-1 loss treats them alike,
which is why the cached and the live path give the same loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.hf import base_model
from vlmdistill.hooks import ActivationCapture, HookManager

from .families import ClipModelSpec


@dataclasses.dataclass
class TowerFeatures:
    image_map: Optional[torch.Tensor] = None     # [B, C, h, w]
    text_tokens: Optional[torch.Tensor] = None   # [B, L, D]
    text_mask: Optional[torch.Tensor] = None     # [B, L] bool
    image_embeds: Optional[torch.Tensor] = None  # [B, E], L2-normalised
    text_embeds: Optional[torch.Tensor] = None   # [B, E], L2-normalised

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TowerFeatures":
        def move(t):
            if t is None:
                return None
            if t.is_floating_point() and dtype is not None:
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return TowerFeatures(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def normalised(self, kind: str) -> "TowerFeatures":
        """Parameter-free LayerNorm over the channels of the map and the token states."""
        if kind == "none":
            return self
        image = self.image_map
        if image is not None:
            image = F.layer_norm(image.transpose(1, -1), image.shape[1:2]).transpose(1, -1)
        tokens = self.text_tokens
        if tokens is not None:
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
        return dataclasses.replace(self, image_map=image, text_tokens=tokens)


class ModelTaps:
    """Hooks on one model's image and text taps; `record()` opens a per-forward store."""

    def __init__(self, model: nn.Module, spec: ClipModelSpec, hooks: HookManager, *, role: str) -> None:
        self.spec = spec
        self._capture = ActivationCapture(base_model(model), [spec.image_module, spec.text_module], hooks, role=role)

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        with self._capture.record() as store:
            yield store

    def features(self, store: dict[str, torch.Tensor], output: Any, pixels: torch.Tensor | None,
                 mask: torch.Tensor | None) -> TowerFeatures:
        spec = self.spec
        image_map = text_tokens = None
        if pixels is not None and spec.image_module in store:
            image_map = spec.image_map(store[spec.image_module], pixels)
        if mask is not None and spec.text_module in store:
            text_tokens = store[spec.text_module]
        image_embeds, text_embeds = spec.embeddings(output)
        return TowerFeatures(image_map=image_map, text_tokens=text_tokens, text_mask=mask,
                             image_embeds=image_embeds, text_embeds=text_embeds)
