"""Recipe builders for `vlmdistill train configs/ccd/*.yaml`.

* model builder `ccd-vit`: a CCD ViT preset (`tiny`, `small`, `base`) with optional field overrides;
* data builder `ccd-rendered-words`: unlabeled 32×128 renderings of standard-library docstring words, each
  example carrying its index as `ccd_seed` so its views do not depend on batching;
* data builder `text-lmdb`: the images of text-recognition LMDBs (`vlmdistill.data.text_lmdb`).
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


@register_data_builder("text-lmdb")
def build_text_lmdb(student, teacher, paths: list[str], height: int = 32, width: int = 128):
    """(dataset, collator) of the images of text-recognition LMDBs (`num-samples`, `image-%09d`; labels, if any, are
    not read: CCD pretrains without them). `paths`: LMDB folders or roots with LMDBs below them, concatenated;
    `ccd_seed` is the sample's position in the concatenation."""
    import torch

    from vlmdistill.data.text_lmdb import TextImageLMDB, find_text_lmdbs

    if isinstance(paths, str):
        paths = [paths]
    parts = [TextImageLMDB(p, labelled=False, size=(height, width)) for root in paths for p in find_text_lmdbs(root)]
    from .rendering import collate_unlabeled

    return _Indexed(torch.utils.data.ConcatDataset(parts)), collate_unlabeled


class _Indexed:
    """Items of a concatenation with their global index (so CCD's per-sample views differ across the parts)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"pixel_values": self.data[i]["pixel_values"], "ccd_seed": torch.tensor(i)}
