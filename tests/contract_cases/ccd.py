import numpy as np
import torch

from contract_cases import ContractCase

WORDS = ["text", "image", "recognise", "paired", "glyph", "vision", "pixel", "scene", "model", "token", "slot"]


def tiny_vit(seed: int = 1):
    """A transformers ViTModel on 32x128 text images with 4x4 patches (CLS token included)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=(32, 128), patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(cfg, add_pooling_layer=False)


def word_examples(n: int, seed: int) -> list[dict]:
    from vlmdistill.data.rendered_words import render_word, to_pixel_values

    rng = np.random.default_rng(seed)
    words = [WORDS[int(rng.integers(len(WORDS)))] for _ in range(n)]
    pixels = to_pixel_values(np.stack([render_word(w, rng) for w in words]))
    return [{"pixel_values": pixels[i], "ccd_seed": torch.tensor(seed * 1000 + i)} for i in range(n)]


def _collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


# Small heads and short schedules so every stage (frozen prototypes: step 0, pseudo -> predicted masks: after step
# 2) is crossed.
CONFIG = {"seg_blocks": [1, 2, 3], "seg_hidden_channels": 16, "seg_map_channels": 8, "seg_groups": 4,
          "out_dim": 64, "head_hidden_dim": 32, "bottleneck_dim": 16, "pseudo_mask_fraction": 0.1,
          "freeze_last_layer_fraction": 0.05, "teacher_momentum": 0.9, "total_steps": 20}


def case() -> ContractCase:
    return ContractCase(
        make_student=lambda: tiny_vit(seed=1),
        make_teacher=lambda student: None,
        config=dict(CONFIG),
        examples=word_examples,
        collate=_collate,
    )
