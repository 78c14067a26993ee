"""Offline text images: words rendered with the fonts matplotlib ships (DejaVu, STIX) into 32×128 RGB images.

Used by the ccd demo, its benchmark and the tests; words come from the Python standard library's docstrings.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import torch

from vlmdistill.data.image_stats import IMAGENET_MEAN, IMAGENET_STD, normalise
from vlmdistill.data.text_lmdb import CHARSET_36
from vlmdistill.extras import require

IMAGE_SIZE = (32, 128)

_FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)


@functools.lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    matplotlib = require("matplotlib", "rendering text images (its bundled fonts)")

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = tuple(os.path.join(folder, name) for name in _FONT_FILES if os.path.isfile(os.path.join(folder, name)))
    if not paths:
        raise FileNotFoundError(f"no DejaVu/STIX fonts found in {folder}")
    return paths


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def render_word(word: str, rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """One `[H, W, 3]` uint8 image: random font, size, colours (contrast ≥ 90 grey levels) and margins; the text
    box is stretched to the image size, as text recognisers resize their inputs."""
    from PIL import Image, ImageDraw

    paths = font_paths()
    font = _font(paths[int(rng.integers(len(paths)))], int(rng.integers(26, 40)))
    background = rng.integers(0, 256, 3)
    while True:
        ink = rng.integers(0, 256, 3)
        if abs(_luma(ink) - _luma(background)) >= 90:
            break
    left, top, right, bottom = font.getbbox(word)
    margin_x = int(rng.integers(2, 12))
    margin_y = int(rng.integers(1, 6))
    canvas = Image.new("RGB", (right - left + 2 * margin_x, bottom - top + 2 * margin_y), tuple(int(v) for v in
                                                                                               background))
    ImageDraw.Draw(canvas).text((margin_x - left, margin_y - top), word, font=font, fill=tuple(int(v) for v in ink))
    return np.asarray(canvas.resize((size[1], size[0]), Image.BILINEAR))


def render_words(words: list[str], seed: int, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """`[N, H, W, 3]` uint8 renderings of `words`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([render_word(word, rng, size) for word in words]) if words else \
        np.zeros((0, size[0], size[1], 3), dtype=np.uint8)


def to_pixel_values(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` -> normalised float `[N, 3, H, W]` (the plugin's default `image_mean`/`image_std`)."""
    return normalise(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0, mean, std)


def docstring_words(min_len: int = 3, max_len: int = 10, charset: str = CHARSET_36) -> tuple[list[str], list[str]]:
    """(training words, held-out words) from the standard-library docstrings, split by source module; lower-cased,
    sorted, only characters of `charset`. Held-out words come from modules the training words never saw."""
    from vlmdistill.data.text import split_by_module, stdlib_docstrings

    train_texts, held_texts = split_by_module(stdlib_docstrings())
    allowed = set(charset)

    def words(texts: list[str]) -> list[str]:
        found = {w.lower() for text in texts for w in re.findall(r"[A-Za-z0-9]+", text)}
        return sorted(w for w in found if min_len <= len(w) <= max_len and set(w) <= allowed)

    return words(train_texts), words(held_texts)


class WordImages(torch.utils.data.Dataset):
    """Rendered word images as Trainer examples: `pixel_values`, `ccd_seed` (the index) and, optionally, `text`."""

    def __init__(self, images: np.ndarray, texts: list[str] | None = None) -> None:
        self.pixel_values = to_pixel_values(images)
        self.texts = texts

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"pixel_values": self.pixel_values[i], "ccd_seed": torch.tensor(i, dtype=torch.long)}
        if self.texts is not None:
            item["text"] = self.texts[i]
        return item


def collate_unlabeled(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "ccd_seed": torch.stack([it["ccd_seed"] for it in items])}
