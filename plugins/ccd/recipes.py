"""Recipe builders for `vlmdistill train configs/ccd/*.yaml`.

* model builder `ccd-vit`: a CCD ViT preset (`tiny`, `small`, `base`) with optional field overrides;
* data builder `text-lmdb`: the images of text-recognition LMDBs (`vlmdistill.data.text_lmdb`).
"""

from __future__ import annotations

from typing import Any

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


@register_data_builder("text-lmdb")
def build_text_lmdb(student, teacher, paths: list[str], height: int = 32, width: int = 128):
    """(dataset, collator) of the images of text-recognition LMDBs (`num-samples`, `image-%09d`; labels, if any, are
    not read: CCD pretrains without them). `paths`: LMDB folders or roots with LMDBs below them, concatenated;
    `ccd_seed` is the sample's position in the concatenation."""
    import torch

    from vlmdistill.data.rendered_words import collate_unlabeled
    from vlmdistill.data.text_lmdb import TextImageLMDB, find_text_lmdbs

    if isinstance(paths, str):
        paths = [paths]
    parts = [TextImageLMDB(p, labelled=False, size=(height, width)) for root in paths for p in find_text_lmdbs(root)]
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
