"""Model and data builders for `vlmdistill train configs/msd/*.yaml` (registered when the plugin is imported)."""

from __future__ import annotations

from vlmdistill.recipes import register_data_builder, register_model_builder

from .digit_captions import DigitCaptions, caption_tokenizer, digit_caption_split, tiny_clip


@register_model_builder("msd-digits-clip")
def digits_clip(width: int = 64, layers: int = 2, image_size: int = 16, patch_size: int = 4, seed: int = 0):
    """The demo's tiny transformers CLIP, sized for the caption tokenizer."""
    tokenizer = caption_tokenizer()
    return tiny_clip(len(tokenizer), tokenizer.eos_token_id, width=width, layers=layers, image_size=image_size,
                     patch_size=patch_size, seed=seed)


@register_data_builder("msd-digit-captions")
def digit_captions(student, teacher, image_size: int = 16, seed: int = 0):
    """Training split of the bundled digits, each image with a caption drawn from four templates."""
    train, labels, _, _ = digit_caption_split(size=image_size, seed=seed)
    dataset = DigitCaptions(train, labels, caption_tokenizer(), seed=seed)
    return dataset, dataset.collate
