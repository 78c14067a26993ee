"""Real processor classes (LLaVA, Idefics3, SmolVLM, Qwen2-VL) built offline: a locally trained BPE tokenizer, the
family's own image processor at a tiny size, and a chat template in the family's style; plus a tiny model of the
family that matches the processor (image token ids, tokens per image) and a text LM teacher sharing the vocabulary."""

from __future__ import annotations

import torch

CORPUS = ["the cat sat on the mat and looked at the red ball.", "a dog ran in the park after a small bird.",
          "what is in the picture? there is a cat.", "describe the image in one sentence.",
          "the sky is blue and the grass is green.", "how many birds are there? two birds."] * 20

LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

SPECIALS = {
    "llava": ["<image>"],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]],
}
SPECIALS["smolvlm"] = SPECIALS["idefics3"]
FAMILIES = ("llava", "idefics3", "qwen2_vl")  # SmolVLMProcessor also needs the num2words package


def lm_tokenizer():
    """The text LM's tokenizer (what the teacher speaks)."""
    from vlmdistill.data.text import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=160)


def student_tokenizer(family: str, lm_tok=None):
    """The LM's tokenizer plus the family's image tokens, appended after the LM's vocabulary."""
    import copy

    tok = copy.deepcopy(lm_tok or lm_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[family]})
    if family == "qwen2_vl":
        tok.eos_token = "<|im_end|>"
    return tok


def processor(family: str, tokenizer=None):
    """The family's real processor class around a tiny image processor (16-px tiles, 4 tokens per tile)."""
    import transformers as T

    tok = tokenizer or student_tokenizer(family)
    if family == "llava":
        images = T.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return T.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, image_token="<image>",
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=LLAVA_TEMPLATE)
    if family == "qwen2_vl":
        pixels = dict(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
        return T.Qwen2VLProcessor(image_processor=T.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                  video_processor=T.Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_TEMPLATE)
    sizes = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    if family == "idefics3":
        return T.Idefics3Processor(image_processor=T.Idefics3ImageProcessor(**sizes), tokenizer=tok, image_seq_len=4,
                                   chat_template=IDEFICS3_TEMPLATE)
    if family == "smolvlm":
        return T.SmolVLMProcessor(image_processor=T.SmolVLMImageProcessor(**sizes), tokenizer=tok,
                                  video_processor=T.SmolVLMVideoProcessor(), image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    raise KeyError(family)


def model_for(family: str, tokenizer, seed: int = 0, dtype=torch.float32, **text):
    """A tiny model of `family` whose vocabulary and image token ids match `tokenizer`."""
    from contract_cases import lingudistill as cases

    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "qwen2_vl":
        names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
        qwen_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
        model = cases.tiny_qwen2_vl(seed=seed, dtype=dtype, ids=qwen_ids, vocab=vocab, **text)
    else:
        build = {"llava": cases.tiny_llava, "idefics3": cases.tiny_idefics3, "smolvlm": cases.tiny_smolvlm}[family]
        model = build(seed=seed, dtype=dtype, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vocab=vocab, **text)
    text_config = model.config.get_text_config()
    for key, value in ids.items():
        setattr(text_config, key, value)
    return model


def teacher_for(student, lm_tok, seed: int = 7):
    """A text LM with the student LM's architecture over the LM tokenizer's vocabulary."""
    from contract_cases.lingudistill import text_config
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    text = student.config.get_text_config()
    shape = text_config(hidden=text.hidden_size, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                        layers=text.num_hidden_layers, vocab=len(lm_tok))
    shape.update(bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id, pad_token_id=lm_tok.pad_token_id)
    if student.config.model_type == "qwen2_vl":
        rope = {k: v for k, v in text.rope_parameters.items() if k != "mrope_section"}
        return Qwen2ForCausalLM(Qwen2Config(**shape, rope_parameters=rope))
    return LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=dict(text.rope_parameters)))
