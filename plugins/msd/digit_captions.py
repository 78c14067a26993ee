"""Image–caption pairs from the bundled digits and a tiny CLIP to train on them (demo and recipes).

Each training image gets a caption drawn from several templates ("a handwritten seven.", ...), so a
batch holds many near-duplicate pairs — the situation soft targets are meant for. The tokenizer is
a byte-level BPE trained here on the caption templates (deterministic, nothing downloaded), with an
end-of-text token appended to every caption, where CLIP pools the text.
"""

from __future__ import annotations

import random

import torch

from vlmdistill.data.digits import CAPTION_TEMPLATES_EN, DIGIT_NAMES_EN, digit_caption, load_digits_images

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)   # what the zero-shot harness normalises with
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
END_OF_TEXT = "<|endoftext|>"
MAX_TOKENS = 24


def caption_tokenizer(vocab_size: int = 512):
    """A BPE tokenizer trained on every caption, appending END_OF_TEXT (its id is the largest)."""
    from tokenizers.processors import TemplateProcessing

    from vlmdistill.data.text import train_tokenizer

    captions = [digit_caption(label, "en", t) for label in range(10) for t in range(len(CAPTION_TEMPLATES_EN))]
    tokenizer = train_tokenizer(captions, vocab_size=vocab_size)
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, tokenizer.eos_token_id)])
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def tiny_clip(vocab_size: int, eos_token_id: int, *, width: int = 64, layers: int = 2, embed_dim: int = 64,
              image_size: int = 32, patch_size: int = 4, seed: int = 0):
    """A randomly initialised transformers CLIPModel small enough to train on two CPU cores."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    heads = max(1, width // 32)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                         eos_token_id=eos_token_id, pad_token_id=0, bos_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=embed_dim)
    return CLIPModel(config)


def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> the model's input (OpenAI mean/std, as the zero-shot harness uses)."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


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


def digit_caption_split(size: int = 32, seed: int = 0):
    """(train images, train labels, test images, test labels) of the bundled digits, images in [0, 1]."""
    return load_digits_images(size=size, seed=seed)


__all__ = ["caption_tokenizer", "tiny_clip", "DigitCaptions", "digit_caption_split", "normalise_pixels",
           "DIGIT_NAMES_EN"]
