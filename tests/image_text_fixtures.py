"""Image-text data and model folders on disk, as a user would have them (shared by the image-text tests)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["a photo of the digit {}.", "数字{}的照片。"]
NAMES = [["zero", "one", "two", "three"], ["零", "一", "二", "三"]]


def caption(i: int) -> str:
    language = i % 2
    return CAPTIONS[language].format(NAMES[language][i % 4])


def image(i: int, size: tuple[int, int] = (20, 28)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8))


def write_image_folder(folder, n: int = 8, *, fmt: str = "jsonl", subdir: str = "images") -> list[dict]:
    """An image folder with `metadata.jsonl` (or `.csv`): file_name, text, language."""
    os.makedirs(os.path.join(folder, subdir), exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{subdir}/{i:03d}.png"
        image(i).save(os.path.join(folder, name))
        rows.append({"file_name": name, "text": caption(i), "language": ("en", "zh")[i % 2]})
    if fmt == "jsonl":
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import csv

        with open(os.path.join(folder, "metadata.csv"), "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def caption_tokenizer():
    from vlmdistill.data.text import train_caption_tokenizer

    texts = [CAPTIONS[lang].format(name) for lang in range(2) for name in NAMES[lang]]
    return train_caption_tokenizer(texts, vocab_size=300)


def save_clip_folder(folder, tokenizer, *, family: str = "clip", image_size: int = 16, processor: bool = True,
                     seed: int = 0, **sizes) -> str:
    """A CLIP-family checkpoint folder: model, tokenizer and (optionally) its image processor."""
    from vlmdistill.eval.tiny_models import tiny_hf_clip

    model = tiny_hf_clip(family, image_size=image_size, vocab=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, seed=seed, **sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if processor:
        from transformers import CLIPImageProcessor, SiglipImageProcessor

        if family == "siglip":
            SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
        else:
            CLIPImageProcessor(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


def token_batch(n: int, length: int = 9, vocab: int = 64, *, seed: int = 0, eos: int = 3, bos: int = 2,
                min_length: int = 4) -> dict[str, torch.Tensor]:
    """Right-padded token ids (pad 0) for CLIP text towers, with bos/eos and varying lengths, and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(min_length, length + 1, (1,), generator=g))
        ids[i, :k] = torch.randint(eos + 1, vocab, (k,), generator=g)
        ids[i, 0], ids[i, k - 1] = bos, eos
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}
