"""Recipe builders for `vlmdistill train configs/ccd/*.yaml`.

* model builder `ccd-vit`: a CCD ViT preset (`tiny`, `small`, `base`) with optional field overrides;
* data builder `ccd-rendered-words`: unlabeled 32×128 renderings of standard-library docstring words, each
  example carrying its index as `ccd_seed` so its views do not depend on batching.
"""

from __future__ import annotations

from typing import Any, Optional

from vlmdistill.errors import ConfigError
from vlmdistill.recipes import register_data_builder, register_model_builder


@register_model_builder("ccd-vit")
def build_ccd_vit(size: str = "small", seed: int = 0, **overrides: Any):
    """`ccd_vit(size, **overrides)`, e.g. `{size: tiny, embed_dim: 64, depth: 4, num_heads: 2}`."""
    import torch

    from .vit import PRESETS, ccd_vit

    if size not in PRESETS:
        raise ConfigError(f"student.kwargs.size {size!r}: choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    return ccd_vit(size, **overrides)


@register_data_builder("ccd-rendered-words")
def build_rendered_words(student, teacher, images: int = 3000, seed: int = 0, split: str = "train",
                         words: Optional[list[str]] = None):
    """(dataset, collator) of `images` unlabeled word renderings (`pixel_values`, `ccd_seed`); the words are
    drawn from `words` if given, else from the docstring vocabulary's `split`."""
    import numpy as np

    from .rendering import WordImages, collate_unlabeled, docstring_words, render_words

    if split not in ("train", "held_out"):
        raise ConfigError(f"data.kwargs.split {split!r}: choose 'train' or 'held_out'")
    if not words:
        train_words, held_words = docstring_words()
        words = train_words if split == "train" else held_words
    chosen = [words[i] for i in np.random.default_rng(seed).integers(len(words), size=images)]
    return WordImages(render_words(chosen, seed + 1)), collate_unlabeled
