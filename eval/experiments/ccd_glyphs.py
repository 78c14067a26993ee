"""Rendered letter strings with ground truth for the CCD miniature: every image comes with its text mask and the
box of each character, drawn glyph by glyph so that the masks are exact (not estimated from the image)."""

from __future__ import annotations

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
SIZE = (32, 128)


def _fonts(size: int):
    import os

    from vlmdistill.data.rendered_words import _font, font_paths

    folder = os.path.dirname(font_paths()[0])
    return [_font(os.path.join(folder, name), size) for name in FONT_FILES if os.path.isfile(os.path.join(folder,
                                                                                                          name))]


def _luma(rgb) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def render_glyph_string(word: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(`[32, 128, 3]` uint8 image, `[32, 128]` bool text mask, `[len(word), 4]` int boxes x0, y0, x1, y1 (exclusive
    ends)). One font of four, 20–24 px, glyphs 1–3 px apart at a random position, ink and background ≥ 90 grey
    levels apart."""
    from PIL import Image, ImageDraw

    h, w = SIZE
    fonts = _fonts(int(rng.integers(20, 25)))
    font = fonts[int(rng.integers(len(fonts)))]
    gap = int(rng.integers(1, 4))
    advances = [font.getlength(c) for c in word]
    total = sum(advances) + gap * (len(word) - 1)
    if total > w - 4:
        raise ValueError(f"{word!r} is {total:.0f} px wide at this font size; the image is {w}")
    x = float(rng.uniform(2, w - 2 - total))
    top, bottom = font.getbbox("h")[1], font.getbbox("g")[3]   # ascender to descender
    y = float(rng.uniform(-top + 1, h - 1 - bottom)) if h - 1 - bottom > -top + 1 else -top
    background = rng.integers(0, 256, 3)
    while True:
        ink = rng.integers(0, 256, 3)
        if abs(_luma(ink) - _luma(background)) >= 90:
            break
    alpha = np.zeros((h, w), dtype=np.float32)
    boxes = []
    for char, advance in zip(word, advances):
        layer = Image.new("L", (w, h), 0)
        ImageDraw.Draw(layer).text((x, y), char, font=font, fill=255)
        glyph = np.asarray(layer, dtype=np.float32) / 255
        ys, xs = np.nonzero(glyph > 0.25)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        alpha = np.maximum(alpha, glyph)
        x += advance + gap
    image = background[None, None] * (1 - alpha[..., None]) + ink[None, None] * alpha[..., None]
    return np.rint(image).astype(np.uint8), alpha > 0.5, np.asarray(boxes, dtype=np.int64)


def glyph_strings(count: int, seed: int, lengths: tuple[int, int] = (3, 6)) -> dict:
    """`count` random lower-case strings (lengths uniform in `lengths`) rendered with their ground truth:
    `images [N, 32, 128, 3]`, `masks [N, 32, 128]`, `boxes` (list of `[L, 4]`), `words`."""
    rng = np.random.default_rng(seed)
    images, masks, boxes, words = [], [], [], []
    while len(words) < count:
        word = "".join(rng.choice(list(LETTERS), size=int(rng.integers(lengths[0], lengths[1] + 1))))
        try:
            image, mask, box = render_glyph_string(word, rng)
        except ValueError:   # too wide in the drawn font size: draw another string
            continue
        images.append(image)
        masks.append(mask)
        boxes.append(box)
        words.append(word)
    return {"images": np.stack(images), "masks": np.stack(masks), "boxes": boxes, "words": words}


def box_masks(boxes: list[np.ndarray], max_characters: int) -> np.ndarray:
    """`[N, K, 32, 128]` bool: slot k of image i is character k's box (empty after the word ends)."""
    h, w = SIZE
    out = np.zeros((len(boxes), max_characters, h, w), dtype=bool)
    for i, box in enumerate(boxes):
        for k, (x0, y0, x1, y1) in enumerate(box[:max_characters]):
            out[i, k, y0:y1, x0:x1] = True
    return out
