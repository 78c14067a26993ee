"""Recipe builders for `vlmdistill train configs/lingudistill/*.yaml`.

`lingudistill-toy-llava` / `lingudistill-toy-lm` give the demo's miniature VLM and its original language model;
the parts (tokenizer, language model, vision encoder) are trained once into a local folder and reused after.
`lingudistill-digits` is the demo's fine-tuning mixture (digit captions, digit questions, text blocks).
"""

from __future__ import annotations

import os

import torch

from vlmdistill.recipes import register_data_builder, register_model_builder

from .toy_vlm import (DigitTasks, IMAGE_TOKEN, SampleDataset, collate_samples, image_tokens, llava_from_parts,
                      student_tokenizer, train_language_model, train_vision_encoder)

DEFAULT_PARTS = "runs/lingudistill-parts"
BLOCK = 64


def prepare_parts(folder: str = DEFAULT_PARTS, lm_steps: int = 400, vision_steps: int = 300, vocab: int = 1024):
    """(language model, vision encoder, tokenizer), trained on first use and saved under `folder`."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    paths = {name: os.path.join(folder, name) for name in ("tokenizer", "language_model", "vision_encoder")}
    if not all(os.path.isdir(p) for p in paths.values()):
        from vlmdistill.data.digits import load_digits_images
        from vlmdistill.data.text import pack_examples, split_by_module, stdlib_docstrings, train_tokenizer

        train_texts, _ = split_by_module(stdlib_docstrings())
        tokenizer = train_tokenizer(train_texts, vocab_size=vocab)
        # The caller's random stream must not depend on whether the parts existed already: a first run and a
        # rerun then build the same model (a fresh projector) from the same seed.
        with torch.random.fork_rng(devices=[]):
            lm = train_language_model(pack_examples(train_texts, tokenizer, BLOCK), len(tokenizer), lm_steps)
            images, labels, _, _ = load_digits_images(size=16)
            vision = train_vision_encoder(images, labels, vision_steps)
        tokenizer.save_pretrained(paths["tokenizer"])
        lm.save_pretrained(paths["language_model"])
        vision.save_pretrained(paths["vision_encoder"])
    return (LlamaForCausalLM.from_pretrained(paths["language_model"]).eval(),
            CLIPVisionModel.from_pretrained(paths["vision_encoder"]).eval(),
            AutoTokenizer.from_pretrained(paths["tokenizer"]))


@register_model_builder("lingudistill-toy-llava")
def toy_llava(parts: str = DEFAULT_PARTS, lm_steps: int = 400, vision_steps: int = 300, freeze_vision: bool = True):
    """The demo's LLaVA: pre-trained vision encoder, fresh projector, a copy of the pre-trained LM."""
    lm, vision, tokenizer = prepare_parts(parts, lm_steps, vision_steps)
    vlm = llava_from_parts(lm, vision, student_tokenizer(tokenizer).convert_tokens_to_ids(IMAGE_TOKEN))
    if freeze_vision:
        vlm.model.vision_tower.requires_grad_(False)
    return vlm


@register_model_builder("lingudistill-toy-lm")
def toy_lm(parts: str = DEFAULT_PARTS, lm_steps: int = 400, vision_steps: int = 300):
    """The original language model of `lingudistill-toy-llava` (the teacher)."""
    return prepare_parts(parts, lm_steps, vision_steps)[0]


@register_data_builder("lingudistill-digits")
def digits(student, teacher, parts: str = DEFAULT_PARTS, text_blocks: int = 256, seed: int = 0):
    """Digit captions + digit questions on the training images, plus `text_blocks` docstring blocks; the
    tokenizers go to wrap() so that the vocabulary prefix is checked token by token."""
    from vlmdistill.data.digits import load_digits_images
    from vlmdistill.data.text import pack_examples, split_by_module, stdlib_docstrings

    _, vision, tokenizer = prepare_parts(parts)
    s_tok = student_tokenizer(tokenizer)
    tasks = DigitTasks(s_tok, image_tokens(vision))
    images, labels, _, _ = load_digits_images(size=16)
    text = None
    if text_blocks:
        train_texts, _ = split_by_module(stdlib_docstrings())
        blocks = pack_examples(train_texts, tokenizer, BLOCK)
        text = blocks[torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:text_blocks]]
    runtime = {"student_tokenizer": s_tok, "teacher_tokenizer": tokenizer}
    return SampleDataset(tasks.mixture(images, labels, text, seed=seed)), collate_samples, runtime
