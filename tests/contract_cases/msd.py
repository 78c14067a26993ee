"""Contract case of `msd`: a tiny random transformers CLIPModel trained contrastively with its own EMA teacher."""

import torch

from contract_cases import ContractCase

VOCAB, LENGTH, IMAGE = 50, 7, 16


def tiny_clip(seed: int = 1, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=LENGTH, eos_token_id=VOCAB - 1,
                         bos_token_id=0, pad_token_id=1, dropout=0.0, attention_dropout=0.0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8, dropout=0.0, attention_dropout=0.0),
        projection_dim=projection_dim)
    return CLIPModel(config)


def examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB - 1, (n, LENGTH), generator=g)
    ids[:, -1] = VOCAB - 1  # end-of-text token: where CLIP pools the caption
    pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "pixel_values": pixels[i]}
            for i in range(n)]


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def case() -> ContractCase:
    return ContractCase(
        make_student=tiny_clip,
        make_teacher=lambda student: None,   # msd builds its own EMA teacher
        config={"alpha": 0.4, "alpha_warmup_steps": 2, "momentum": 0.9, "queue_size": 8},
        examples=examples,
        collate=collate,
        trainer="DistillationTrainer",
    )
