"""The ccd demo's data builder for `vlmdistill train configs/ccd/demo.yaml`: `ccd-rendered-words`, unlabeled 32×128
renderings of standard-library docstring words, each example carrying its index as `ccd_seed` so its views do not
depend on batching. Registered when a recipe looks a builder up (the ccd plugin names this module in
`recipe_builders`)."""

from __future__ import annotations

from typing import Optional

from vlmdistill.errors import ConfigError
from vlmdistill.recipes import register_data_builder


@register_data_builder("ccd-rendered-words")
def build_rendered_words(student, teacher, images: int = 3000, seed: int = 0, split: str = "train",
                         words: Optional[list[str]] = None):
    """(dataset, collator) of `images` unlabeled word renderings (`pixel_values`, `ccd_seed`); the words are
    drawn from `words` if given, else from the docstring vocabulary's `split`."""
    import numpy as np

    from vlmdistill.data.rendered_words import WordImages, collate_unlabeled, docstring_words, render_words

    if split not in ("train", "held_out"):
        raise ConfigError(f"data.kwargs.split {split!r}: choose 'train' or 'held_out'")
    if not words:
        train_words, held_words = docstring_words()
        words = train_words if split == "train" else held_words
    chosen = [words[i] for i in np.random.default_rng(seed).integers(len(words), size=images)]
    return WordImages(render_words(chosen, seed + 1)), collate_unlabeled
