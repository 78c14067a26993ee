"""dcclip contract case: a tiny HF CLIP student, a wider and deeper HF CLIP teacher with a finer patch
grid (so the adapters and the spatial alignment are exercised), both on one 64-token vocabulary.
The stage switch after optimizer step 2 puts both resume checks (3+3 steps; Trainer checkpoint at
step 2 of 4) across it."""

import torch

from contract_cases import ContractCase
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch


def _examples(n, seed):
    tokens = token_batch(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    return [{"input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i],
             "pixel_values": pixels[i], "sample_key": f"s{seed}-{i}", "augmentation_seed": torch.tensor(0),
             "teacher_pixel_values": pixels[i], "teacher_input_ids": tokens["input_ids"][i],
             "teacher_attention_mask": tokens["attention_mask"][i]} for i in range(n)]


def _collate(examples):
    return {k: [e[k] for e in examples] if isinstance(examples[0][k], str) else torch.stack([e[k] for e in examples])
            for k in examples[0]}


def case() -> ContractCase:
    return ContractCase(
        make_student=lambda: tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=1),
        make_teacher=lambda student: tiny_hf_clip(hidden=32, layers=2, patch=4, projection=24, seed=2),
        config={"stage": 1, "switch_at_step": 2, "embedding_weight": 0.5},
        examples=_examples,
        collate=_collate,
    )
