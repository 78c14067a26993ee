"""Small real models for tests and benchmarks of the harness, built offline from configs.

* `save_tiny_hf_model(folder, model_type, texts)`: a randomly initialised transformers CLIP /
  SigLIP / ChineseCLIP / AltCLIP with a word-level tokenizer over `texts` and an image processor,
  saved like a downloaded model folder.
* `tiny_open_clip()`: an open_clip CLIP from a small custom config (registered under a name).
* `OracleCLIP`: a model whose class embeddings are one-hot and whose images carry their labels as
  bright vertical stripes, so every metric of a correct harness is exactly 1.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..tiny_models import open_clip_config, tiny_hf_clip

TINY_OPEN_CLIP_NAME = "vlmdistill-test-clip"
_TINY_OPEN_CLIP_SIZE = dict(width=32, layers=1, patch=8, image_size=32, vocab=49408, context=24, embed_dim=16)
TINY_OPEN_CLIP_CONFIG = open_clip_config("vit", **_TINY_OPEN_CLIP_SIZE)
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_level_tokenizer(texts: Sequence[str], model_max_length: int = 32):
    """A real fast tokenizer whose vocabulary is the words (and CJK characters) of `texts`."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    pieces = set()
    for text in texts:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate(_SPECIALS + sorted(pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="[CLS]", eos_token="[SEP]", model_max_length=model_max_length)


def tiny_hf_model(model_type: str, vocab_size: int, image_size: int = 32, max_length: int = 32, seed: int = 0):
    """A randomly initialised transformers model of the CLIP family, small enough for a unit test."""
    text = dict(bos_token_id=2, eos_token_id=3, **{"chinese_clip": {"type_vocab_size": 2},
                                                   "altclip": {"type_vocab_size": 1}}.get(model_type, {}))
    return tiny_hf_clip(model_type, hidden=32, layers=1, heads=4, patch=8, image_size=image_size, vocab=vocab_size,
                        max_positions=max_length, projection=16, text_config=text, seed=seed)


def tiny_image_processor(model_type: str, image_size: int = 32):
    import transformers

    if model_type == "siglip":
        return transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})


def save_tiny_hf_model(folder: str, model_type: str, texts: Sequence[str], seed: int = 0) -> str:
    """Model, tokenizer and image processor in `folder`, as `from_pretrained` expects them."""
    tokenizer = word_level_tokenizer(texts, model_max_length=32)
    model = tiny_hf_model(model_type, len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tiny_image_processor(model_type).save_pretrained(folder)
    return folder


def tiny_open_clip(seed: int = 0):
    """(model, tokenizer) of an open_clip CLIP built from `TINY_OPEN_CLIP_CONFIG`."""
    import open_clip

    from ..tiny_models import tiny_open_clip as build

    model, name = build("vit", seed=seed, name=TINY_OPEN_CLIP_NAME, **_TINY_OPEN_CLIP_SIZE)
    return model.eval(), open_clip.get_tokenizer(name)


# ------------------------------------------------------------------ oracle

STRIPE = 4   # pixels per class stripe


def stripe_image(positives: Sequence[int], num_classes: int) -> Image.Image:
    """A square image with a white vertical stripe for each positive class, black elsewhere."""
    side = STRIPE * num_classes
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    for label in positives:
        pixels[:, label * STRIPE:(label + 1) * STRIPE] = 255
    return Image.fromarray(pixels)


class OracleCLIP(nn.Module):
    """Images -> multi-hot of their stripes; texts (class indices from `OracleTokenizer`) -> one-hot."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))   # gives the adapter a device and dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        columns = pixels.mean(dim=(1, 2))                       # [B, W]
        stripes = columns.reshape(len(pixels), self.num_classes, -1).mean(dim=-1)
        return (stripes > 0.5).to(pixels.dtype) * self.scale

    def encode_text(self, class_index: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(class_index, self.num_classes).to(self.scale.dtype) * self.scale


class OracleTokenizer:
    """Maps a prompt to the index of the class name it contains (longest name first)."""

    def __init__(self, classnames: Sequence[str]) -> None:
        self.order = sorted(range(len(classnames)), key=lambda i: -len(classnames[i]))
        self.patterns = {i: re.compile(rf"(?<!\w){re.escape(classnames[i])}(?!\w)") for i in self.order}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        indices = []
        for text in texts:
            found = [i for i in self.order if self.patterns[i].search(text)]
            if not found:
                raise ValueError(f"no class name in prompt {text!r}")
            indices.append(found[0])
        return torch.tensor(indices)


def oracle_adapter(classnames: Sequence[str]):
    """The oracle wrapped like any generic model: identity preprocessing at its native size."""
    from .adapters import adapter_for

    num_classes = len(classnames)
    return adapter_for(OracleCLIP(num_classes), OracleTokenizer(classnames), image_size=STRIPE * num_classes,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), name="oracle")
