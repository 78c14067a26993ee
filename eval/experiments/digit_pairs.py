"""A contrastive task where in-batch negatives matter: 100 compositional classes from pairs of real digits.

Each image is two of scikit-learn's 8×8 handwritten digits side by side (16×16 with the pair centred); its class is
the ordered pair (3, 7) and its caption says so ("a 3 next to a 7."). Like radiology reports, where many studies
are described by the same few "normal" sentences, about 30% of the training pairs carry one of a few
near-duplicate captions that name no digit ("two handwritten digits."): in a batch they are false negatives of
one another, and the other pairs of the same class are near-duplicates too. Train, validation and test pairs are
built from disjoint digit images (the validation split chooses hyperparameters; the test split only reports).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from vlmdistill.data.digits import DigitCaptions

SPECIFIC = ["a {a} next to a {b}.", "a {a} to the left of a {b}.", "the digits {a} and {b}.", "{a} followed by {b}."]
GENERIC = ["two handwritten digits.", "a pair of handwritten digits.", "two digits side by side.",
           "handwritten digits, two of them."]
GENERIC_FRACTION = 0.3
CLASSES = 100
IMAGE_SIZE = 16


def class_caption(label: int, template: int = 0) -> str:
    return SPECIFIC[template % len(SPECIFIC)].format(a=label // 10, b=label % 10)


def all_captions() -> list[str]:
    return [class_caption(c, t) for c in range(CLASSES) for t in range(len(SPECIFIC))] + GENERIC


def pair_images(digits: torch.Tensor, digit_labels: torch.Tensor, count: int, seed: int):
    """`count` images `[count, 3, 16, 16]` in [0, 1] of random ordered digit pairs, and their class (10·a + b).
    Every class gets the same number of images (up to rounding)."""
    rng = np.random.default_rng(seed)
    by_digit = [np.flatnonzero(digit_labels.numpy() == d) for d in range(10)]
    classes = np.resize(np.arange(CLASSES), count)
    rng.shuffle(classes)
    images = torch.zeros(count, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, c in enumerate(classes):
        left, right = rng.choice(by_digit[c // 10]), rng.choice(by_digit[c % 10])
        images[i, :, 4:12, 0:8] = digits[left]
        images[i, :, 4:12, 8:16] = digits[right]
    return images, torch.from_numpy(classes).long()


def splits(seed: int = 0, train: int = 4000, val: int = 1000, test: int = 1000) -> dict:
    """Pairs from disjoint digit images: 80% / 20% of the digits' training split for train / validation, the
    digits' test split for test."""
    from vlmdistill.data.digits import load_digits_images

    digits, labels, test_digits, test_labels = load_digits_images(size=8, seed=0)
    cut = int(0.8 * len(labels))
    out = {}
    for name, (x, y, n, s) in {"train": (digits[:cut], labels[:cut], train, seed),
                               "val": (digits[cut:], labels[cut:], val, seed + 1),
                               "test": (test_digits, test_labels, test, seed + 2)}.items():
        out[name], out[name + "_labels"] = pair_images(x, y, n, s)
    return out


def caption_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on every caption, appending an end-of-text token (where CLIP pools)."""
    from vlmdistill.data.digits import digit_caption_tokenizer

    return digit_caption_tokenizer(all_captions(), vocab_size=vocab_size)


class PairCaptions(DigitCaptions):
    """(pixel_values, input_ids) of the training pairs, padded by `DigitCaptions.collate`. Whether a pair is
    "generic" is fixed per pair; the template is drawn from (seed, epoch, index) alone, so a resumed run sees the
    same captions."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, tokenizer, seed: int = 0) -> None:
        super().__init__(images, labels, tokenizer, seed)
        self.generic = np.random.default_rng(10_007 + seed).random(len(labels)) < GENERIC_FRACTION

    def caption(self, index: int) -> str:
        draw = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        if self.generic[index]:
            return GENERIC[draw.randrange(len(GENERIC))]
        return class_caption(int(self.labels[index]), draw.randrange(len(SPECIFIC)))
