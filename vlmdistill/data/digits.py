"""scikit-learn's 1,797 real 8×8 handwritten digits, upscaled, with English and Chinese captions."""

from __future__ import annotations

import numpy as np
import torch

from ..extras import require

DIGIT_NAMES_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_NAMES_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]

CAPTION_TEMPLATES_EN = ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand.",
                        "a low resolution image of a {}."]
CAPTION_TEMPLATES_ZH = ["数字{}的照片。", "手写的{}。", "一个手写的数字{}。", "低分辨率的数字{}图像。"]


def load_digits_images(size: int = 32, seed: int = 0, test_fraction: float = 0.25):
    """Digit images as float tensors in [0, 1], `[N, 3, size, size]`, with a fixed shuffled split.

    Returns (train_images, train_labels, test_images, test_labels).
    """
    load_digits = require("sklearn.datasets", "the bundled digit images").load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # 0..16 intensities
    images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="bilinear",
                                             align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
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
