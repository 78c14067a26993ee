"""Reading image and text embeddings of a dual encoder, and its temperature.

A forward of the whole model (`model(**batch)`) is used for student and teacher alike, so the
student's own output object comes back to the caller. Embeddings come from that output
(transformers `image_embeds`/`text_embeds`, open_clip `image_features`/`text_features` or its
tuple) or, when module paths are configured, from forward hooks on those modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hf import base_model, forward_parameters, infer_width
from vlmdistill.hooks import ActivationCapture

_OUTPUT_KEYS = (("image_embeds", "text_embeds"), ("image_features", "text_features"))


def embeddings_from_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) embeddings in a dual encoder's forward output."""
    if isinstance(output, Mapping):
        for image_key, text_key in _OUTPUT_KEYS:
            image, text = output.get(image_key), output.get(text_key)
            if isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor):
                return image, text
    if isinstance(output, (tuple, list)) and len(output) >= 2 \
            and all(isinstance(x, torch.Tensor) and x.dim() == 2 for x in output[:2]):
        return output[0], output[1]  # open_clip with output_dict=False
    kind = type(output).__name__
    keys = list(output.keys()) if isinstance(output, Mapping) else None
    raise UnsupportedModelError(
        f"msd: cannot find image and text embeddings in the model's {kind} output (keys: {keys}); expected "
        "image_embeds/text_embeds (transformers) or image_features/text_features (open_clip). Set "
        "image_embeds_module / text_embeds_module to read them through hooks")


def normalised(x: torch.Tensor) -> torch.Tensor:
    # At least fp32 for the similarity matrices: a bf16 student's logits over B + K keys would lose precision.
    return F.normalize(x.float() if x.element_size() < 4 else x, dim=-1)


def model_logit_scale(model: nn.Module) -> torch.Tensor | None:
    """The model's learnable log inverse temperature (CLIP, SigLIP, open_clip, VisionTextDualEncoder)."""
    scale = getattr(base_model(model), "logit_scale", None)
    # (a ZeRO-3 partitioned parameter has numel() 0 outside a gather: its size is ds_numel)
    if isinstance(scale, torch.Tensor) and getattr(scale, "ds_numel", scale.numel()) == 1:
        return scale
    return None


def embedding_width(model: nn.Module, image_module: str | None = None) -> int | None:
    """Width of the joint embedding space, from the model's structure (None if it cannot be told)."""
    inner = base_model(model)
    if image_module is not None:
        return infer_width(inner.get_submodule(image_module))
    config = getattr(inner, "config", None)
    for attr in ("projection_dim",):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    visual = getattr(inner, "visual", None)  # open_clip
    if isinstance(getattr(visual, "output_dim", None), int):
        return visual.output_dim
    text_config = getattr(config, "text_config", None)  # SigLIP: pooled outputs, no projection
    if getattr(config, "model_type", None) == "siglip" and isinstance(getattr(text_config, "hidden_size", None), int):
        return text_config.hidden_size
    return None


def forward_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch entries the model's forward takes (no `return_loss`: the plugin computes the loss)."""
    names, takes_kwargs = forward_parameters(model)
    return {k: v for k, v in batch.items() if k != "return_loss" and (takes_kwargs or k in names)}


class EmbeddingReader:
    """Runs a dual encoder and returns (output, image embeddings, text embeddings), L2-normalised, fp32 or wider."""

    def __init__(self, model: nn.Module, hooks=None, image_module: str | None = None,
                 text_module: str | None = None, role: str = "model") -> None:
        self.capture = None
        if image_module is not None:
            self.capture = ActivationCapture(model, [image_module, text_module], hooks, role=role)
            self.paths = (image_module, text_module)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[dict]:
        if self.capture is None:
            yield {}
        else:
            with self.capture.record() as store:
                yield store

    def run(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        with self._recording() as store:
            output = model(**forward_inputs(model, batch))
        if self.capture is not None:
            missing = [p for p in self.paths if p not in store]
            if missing:
                raise UnsupportedModelError(f"msd: modules {missing} did not run during the forward")
            image, text = store[self.paths[0]], store[self.paths[1]]
        else:
            image, text = embeddings_from_output(output)
        if image.shape[0] != text.shape[0]:
            raise UnsupportedModelError(f"msd: {image.shape[0]} image but {text.shape[0]} text embeddings in one "
                                        "batch; every image needs exactly one caption")
        return output, normalised(image), normalised(text)
