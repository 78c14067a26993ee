"""Contract case of `lingudistill`, and the tiny VLM families its own tests use.

Students are real transformers VLMs built from tiny configs (random weights); a teacher is a causal LM with the
student language model's architecture, either independent or holding exactly the student LM's weights.
"""

from __future__ import annotations

import torch

from contract_cases import ContractCase

VOCAB = 80
IMAGE_TOKEN = 79          # LLaVA / Idefics3 image placeholder
QWEN_IDS = {"image_token_id": 79, "video_token_id": 78, "vision_start_token_id": 77, "vision_end_token_id": 76}
#: image placeholder tokens one 16x16 image takes in each family's tiny config
TOKENS_PER_IMAGE = {"llava": 4, "idefics3": 4, "smolvlm": 4, "qwen2_vl": 4, "qwen2_5_vl": 4, "idefics2": 4,
                    "mistral3": 4, "llava_onevision": 10}
MROPE = ("qwen2_vl", "qwen2_5_vl")
TEXT_IDS = (3, 70)        # ordinary text tokens are drawn from [3, 70)


def text_config(hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2, vocab: int = VOCAB, **extra):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def tiny_llava(seed: int = 0, dtype=torch.float32, image_token_id: int = IMAGE_TOKEN, **text):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(text_config=LlamaConfig(**text_config(**text)).to_dict(), vision_config=vision.to_dict(),
                      image_token_id=image_token_id, projector_hidden_act="gelu", vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).to(dtype)


def tiny_idefics3(seed: int = 0, dtype=torch.float32, image_token_id: int = IMAGE_TOKEN, **text):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    torch.manual_seed(seed)
    cfg = Idefics3Config(text_config=LlamaConfig(**text_config(**text)).to_dict(),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=4),
                         image_token_id=image_token_id, scale_factor=2)
    return Idefics3ForConditionalGeneration(cfg).to(dtype)


def tiny_smolvlm(seed: int = 0, dtype=torch.float32, image_token_id: int = IMAGE_TOKEN, **text):
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    cfg = SmolVLMConfig(text_config=LlamaConfig(**text_config(**text)).to_dict(),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=4),
                        image_token_id=image_token_id, scale_factor=2)
    return SmolVLMForConditionalGeneration(cfg).to(dtype)


def tiny_qwen2_vl(seed: int = 0, dtype=torch.float32, hidden: int = 32, heads: int = 4, ids=None, **text):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    half = hidden // heads // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    cfg = Qwen2VLConfig(text_config=text_config(hidden=hidden, heads=heads, rope_parameters=rope, **text),
                        vision_config=dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2),
                        **(ids or QWEN_IDS))
    return Qwen2VLForConditionalGeneration(cfg).to(dtype)


def tiny_qwen2_5_vl(seed: int = 0, dtype=torch.float32, hidden: int = 32, heads: int = 4, **text):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    half = hidden // heads // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    cfg = Qwen2_5_VLConfig(text_config=text_config(hidden=hidden, heads=heads, rope_parameters=rope, **text),
                           vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                              out_hidden_size=hidden, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0]),
                           **QWEN_IDS)
    return Qwen2_5_VLForConditionalGeneration(cfg).to(dtype)


def tiny_llava_onevision(seed: int = 0, dtype=torch.float32, **text):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    cfg = LlavaOnevisionConfig(text_config=Qwen2Config(**text_config(**text)).to_dict(), vision_config=vision,
                               image_token_id=IMAGE_TOKEN, video_token_id=QWEN_IDS["video_token_id"],
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[[16, 16]])
    return LlavaOnevisionForConditionalGeneration(cfg).to(dtype)


def tiny_idefics2(seed: int = 0, dtype=torch.float32, **text):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Idefics2Config(text_config=dict(model_type="mistral", sliding_window=None, **text_config(**text)),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=4),
                         perceiver_config=dict(hidden_size=32, resampler_n_latents=TOKENS_PER_IMAGE["idefics2"],
                                               resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                                               num_key_value_heads=1),
                         image_token_id=IMAGE_TOKEN)
    return Idefics2ForConditionalGeneration(cfg).to(dtype)


def tiny_mistral3(seed: int = 0, dtype=torch.float32, sliding_window=None, **text):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Mistral3Config(text_config=dict(model_type="mistral", sliding_window=sliding_window, **text_config(**text)),
                         vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                                            head_dim=8),
                         image_token_index=IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(cfg).to(dtype)


FAMILY_BUILDERS = {"llava": tiny_llava, "idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm, "qwen2_vl": tiny_qwen2_vl,
                   "qwen2_5_vl": tiny_qwen2_5_vl, "llava_onevision": tiny_llava_onevision, "idefics2": tiny_idefics2,
                   "mistral3": tiny_mistral3}


def language_model_copy(student):
    """A causal LM (LlamaForCausalLM / Qwen2ForCausalLM) holding exactly the student LM's weights."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    text = student.config.get_text_config()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id")
    values = {k: getattr(text, k) for k in keys}
    if student.config.model_type in MROPE:
        rope = {k: v for k, v in text.rope_parameters.items() if k != "mrope_section"}
        lm = Qwen2ForCausalLM(Qwen2Config(**values, rope_parameters=rope, tie_word_embeddings=False))
    elif text.model_type in ("qwen2", "mistral"):
        cls, config_cls = (Qwen2ForCausalLM, Qwen2Config) if text.model_type == "qwen2" else \
            (MistralForCausalLM, MistralConfig)
        lm = cls(config_cls(**values, rope_parameters=dict(text.rope_parameters), tie_word_embeddings=False,
                            sliding_window=getattr(text, "sliding_window", None)))
    else:
        lm = LlamaForCausalLM(LlamaConfig(**values, rope_parameters=dict(text.rope_parameters),
                                          tie_word_embeddings=False))
    decoder = student.model.get_decoder() if hasattr(student.model, "get_decoder") else student.model.text_model
    missing, unexpected = lm.model.load_state_dict(decoder.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    lm.lm_head.weight.data.copy_(student.lm_head.weight.data)
    return lm.to(student.dtype).eval()


def independent_teacher(student, seed: int = 7):
    """A different LM with the student LM's architecture (the 'original' LM of a fine-tuned VLM)."""
    torch.manual_seed(seed)
    lm = language_model_copy(student)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lm


def vlm_example(family: str, g: torch.Generator, *, length: int = 14, image_at: int | None = 2,
                answer: int = 5) -> dict:
    """One un-batched example: text, (optionally) one image, text, then `answer` supervised tokens (longer than
    `length` where the family's image takes more tokens)."""
    if image_at is not None:
        length = max(length, image_at + TOKENS_PER_IMAGE[family] + answer + 2)
    ids = torch.randint(*TEXT_IDS, (length,), generator=g)
    labels = torch.full((length,), -100)
    labels[-answer:] = ids[-answer:]
    example = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels}
    if family in MROPE:
        example["mm_token_type_ids"] = torch.zeros(length, dtype=torch.long)
    if image_at is None:
        return example
    n = TOKENS_PER_IMAGE[family]
    span = slice(image_at, image_at + n)
    if family in MROPE:
        ids[image_at - 1] = QWEN_IDS["vision_start_token_id"]
        ids[span] = QWEN_IDS["image_token_id"]
        ids[image_at + n] = QWEN_IDS["vision_end_token_id"]
        example["mm_token_type_ids"][span] = 1
        example.update(pixel_values=torch.rand(16, 3 * 2 * 4 * 4, generator=g), image_grid_thw=torch.tensor([1, 4, 4]))
    else:
        ids[span] = IMAGE_TOKEN
        shape = {"idefics3": (1, 3, 16, 16), "smolvlm": (1, 3, 16, 16), "idefics2": (1, 3, 16, 16),
                 "llava_onevision": (2, 3, 16, 16)}.get(family, (3, 16, 16))
        example["pixel_values"] = torch.rand(shape, generator=g)
        if family in ("llava_onevision", "mistral3"):
            example["image_sizes"] = torch.tensor([16, 16])
    return example


def collate(examples: list[dict], pad_side: str = "right") -> dict:
    """Stack examples, padding token rows to one length (`pad_side`); Qwen2-VL patches are concatenated."""
    length = max(int(e["input_ids"].shape[0]) for e in examples)
    batch: dict = {}
    keys = list(dict.fromkeys(k for e in examples for k in e))
    for key in keys:
        values = [e[key] for e in examples if key in e]  # image inputs: only the samples that have images
        if key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            fill = {"labels": -100}.get(key, 0)
            rows = []
            for v in values:
                pad = torch.full((length - v.shape[0],), fill, dtype=v.dtype)
                rows.append(torch.cat([pad, v] if pad_side == "left" else [v, pad]))
            batch[key] = torch.stack(rows)
        elif key in ("pixel_values",) and values[0].dim() == 2:  # Qwen2-VL patches
            batch[key] = torch.cat(values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = list(values)
    return batch


def _contract_examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        # Every sample has an image (the contract tests slice image tensors by sample); KD on two of three.
        e = vlm_example("llava", g, image_at=2 + i % 3)
        e["dataset"] = ("coco", "docvqa", "sciqa")[i % 3]
        e["kd_mask"] = torch.tensor(i % 3 != 1)
        out.append(e)
    return out


def _contract_student():
    student = tiny_llava(seed=1)
    # LLaVA reads the vision tower's hidden states before its final LayerNorm, so that LayerNorm never gets a
    # gradient; DDP without find_unused_parameters would then skip the all-reduce of its whole bucket.
    student.model.vision_tower.post_layernorm.requires_grad_(False)
    return student


def case() -> ContractCase:
    return ContractCase(
        make_student=_contract_student,
        make_teacher=lambda student: independent_teacher(student, seed=2),
        config={"alpha": 0.5, "temperature": 2.0,
                "dataset_categories": {"coco": "captioning", "sciqa": "knowledge", "docvqa": "documents"}},
        examples=_contract_examples,
        collate=collate,
        num_items=lambda batches: sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
    )
