"""The zero-shot classifier: one L2-normalised text embedding per class, cached on disk.

For each class every template is filled in, encoded and normalised; the normalised embeddings are
averaged and the mean re-normalised (the toolkit's rule). The matrix W [D, C] is cached under a key
made of the model fingerprint (weights + tokenizer), the filled-in prompts and the text clean-up,
so a cache hit is exactly the classifier that would have been computed, and encodes no text at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .adapters import ZeroShotModel
from .protocol import clean_text
from .tasks import TaskSpec


@dataclass
class Classifier:
    weights: torch.Tensor   # [D, C], columns L2-normalised
    key: str | None
    cache_hit: bool
    cache_path: str | None


def classifier_key(model_fingerprint: str, classnames: Sequence[str], templates: Sequence[str],
                   text_cleanup: str) -> str:
    payload = json.dumps({"model": model_fingerprint, "classnames": list(classnames),
                          "templates": list(templates), "text_cleanup": text_cleanup},
                         ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@torch.inference_mode()
def encode_classifier(model: ZeroShotModel, classnames: Sequence[str], templates: Sequence[str],
                      text_cleanup: str = "none", batch_size: int = 256) -> torch.Tensor:
    """W [D, C] in fp32. Prompts of all classes are encoded in batches of `batch_size`."""
    prompts = [clean_text(t.format(c), text_cleanup) for c in classnames for t in templates]
    chunks = [model.encode_texts(prompts[i:i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    embeddings = F.normalize(torch.cat(chunks), dim=-1).reshape(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1).T.contiguous()


def _read_cached(path: str, num_classes: int) -> torch.Tensor | None:
    """The cached matrix, or None when absent or unusable (then it is recomputed and overwritten)."""
    if not os.path.isfile(path):
        return None
    try:
        weights = load_file(path)["weights"]
    except Exception:  # noqa: BLE001 - a damaged cache file must never stop an evaluation
        return None
    return weights if weights.ndim == 2 and weights.shape[1] == num_classes else None


def build_classifier(model: ZeroShotModel, task: TaskSpec, *, text_cleanup: str = "none",
                     cache_dir: str | None = None, batch_size: int = 256) -> Classifier:
    """The classifier for `task`, read from `cache_dir` when a matching one is there. Without a cache
    folder the weights are not fingerprinted (hashing a large model costs about a second)."""
    if cache_dir is None:
        weights = encode_classifier(model, task.classnames, task.templates, text_cleanup, batch_size)
        return Classifier(weights, None, False, None)
    key = classifier_key(model.fingerprint(), task.classnames, task.templates, text_cleanup)
    path = os.path.join(cache_dir, f"classifier-{key[:32]}.safetensors")
    stored = _read_cached(path, task.num_classes)
    if stored is not None:
        return Classifier(stored.to(model.device), key, True, path)
    weights = encode_classifier(model, task.classnames, task.templates, text_cleanup, batch_size)
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".tmp"
    save_file({"weights": weights.cpu()}, partial, metadata={"key": key, "task": task.name,
                                                             "num_classes": str(task.num_classes)})
    os.replace(partial, path)   # atomic: readers never see a half-written file
    return Classifier(weights, key, False, path)
