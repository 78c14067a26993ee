"""scikit-learn's 1,797 real 8×8 handwritten digits, upscaled, with English and Chinese captions: the one digit
loader (one fixed split) of the demos, and image–caption pairs for CLIP-style students.

`DigitCaptions` gives each training image a caption drawn from several templates ("a handwritten seven.", ...),
so a batch holds many near-duplicate pairs. `digit_caption_tokenizer` is a byte-level BPE trained on the captions
(deterministic, nothing downloaded), with an end-of-text token appended to every caption, where CLIP pools."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import numpy as np
import torch

from ..extras import require
from .image_stats import OPENAI_MEAN, OPENAI_STD, normalise

DIGIT_NAMES_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_NAMES_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]

CAPTION_TEMPLATES_EN = ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand.",
                        "a low resolution image of a {}."]
CAPTION_TEMPLATES_ZH = ["数字{}的照片。", "手写的{}。", "一个手写的数字{}。", "低分辨率的数字{}图像。"]
END_OF_TEXT = "<|endoftext|>"
MAX_TOKENS = 24


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as scikit-learn ships them: `[N, 8, 8]` intensities 0..16 (float64) and `[N]` labels."""
    data = require("sklearn.datasets", "the bundled digit images").load_digits()
    return data.images, data.target


def load_digits_images(size: int = 32, seed: int = 0, test_fraction: float = 0.25):
    """Digit images as float tensors in [0, 1], `[N, 3, size, size]`, with a fixed shuffled split.

    Returns (train_images, train_labels, test_images, test_labels).
    """
    arrays, targets = load_digits_arrays()
    images = torch.tensor(arrays, dtype=torch.float32) / 16.0  # 0..16 intensities
    images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="bilinear",
                                             align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(targets, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    images, labels = images[order], labels[order]
    n_test = int(round(len(labels) * test_fraction))
    return images[n_test:], labels[n_test:], images[:n_test], labels[:n_test]


def digit_caption(label: int, language: str = "en", template: int = 0) -> str:
    if language == "en":
        return CAPTION_TEMPLATES_EN[template % len(CAPTION_TEMPLATES_EN)].format(DIGIT_NAMES_EN[label])
    if language == "zh":
        return CAPTION_TEMPLATES_ZH[template % len(CAPTION_TEMPLATES_ZH)].format(DIGIT_NAMES_ZH[label])
    raise ValueError(f"language must be 'en' or 'zh', got {language!r}")


def digit_caption_tokenizer(captions: Optional[Sequence[str]] = None, vocab_size: int = 512):
    """A BPE tokenizer trained on `captions` (default: every English digit caption), appending END_OF_TEXT to
    every text (its id is the largest)."""
    from tokenizers.processors import TemplateProcessing

    from .text import train_tokenizer

    if captions is None:
        captions = [digit_caption(label, "en", t) for label in range(10) for t in range(len(CAPTION_TEMPLATES_EN))]
    tokenizer = train_tokenizer(captions, vocab_size=vocab_size)
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, tokenizer.eos_token_id)])
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> CLIP's input (OpenAI mean/std, as the zero-shot harness uses)."""
    return normalise(images, OPENAI_MEAN, OPENAI_STD)


class DigitCaptions(torch.utils.data.Dataset):
    """(pixel_values, input_ids) pairs; each epoch draws every image's caption template afresh.

    The draw is a function of (seed, epoch, index) alone — not of a running generator — so a run resumed from a
    checkpoint sees exactly the captions the uninterrupted run saw (the Trainer calls `set_epoch`). Items hold only
    model inputs, so the Trainer's column pruning keeps them; `collate` pads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, tokenizer, seed: int = 0) -> None:
        self.pixels = normalise_pixels(images)
        self.labels = labels
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        draw = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        return digit_caption(int(self.labels[index]), "en", draw.randrange(len(CAPTION_TEMPLATES_EN)))

    def __getitem__(self, index: int) -> dict:
        ids = self.tokenizer(self.caption(index))["input_ids"]
        return {"pixel_values": self.pixels[index], "input_ids": torch.tensor(ids, dtype=torch.long)}

    def collate(self, items: list[dict]) -> dict:
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = item["input_ids"]
            mask[row, :len(item["input_ids"])] = 1
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": ids,
                "attention_mask": mask}
