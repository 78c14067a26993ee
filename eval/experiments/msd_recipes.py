"""Model and data builders of the msd demo's recipe (`vlmdistill train configs/msd/demo.yaml`), and the demo's tiny
CLIP. Registered when a recipe looks a builder up (the msd plugin names this module in `recipe_builders`)."""

from __future__ import annotations

from vlmdistill.data.digits import MAX_TOKENS, DigitCaptions, digit_caption_tokenizer, load_digits_images
from vlmdistill.recipes import register_data_builder, register_model_builder


def digit_clip(vocab_size: int, eos_token_id: int, *, width: int = 64, layers: int = 2, embed_dim: int = 64,
               image_size: int = 32, patch_size: int = 4, seed: int = 0):
    """The demo's randomly initialised transformers CLIPModel, small enough to train on two CPU cores."""
    from vlmdistill.eval.tiny_models import tiny_hf_clip

    return tiny_hf_clip("clip", hidden=width, layers=layers, heads=max(1, width // 32), patch=patch_size,
                        image_size=image_size, vocab=vocab_size, max_positions=MAX_TOKENS, projection=embed_dim,
                        eos_token_id=eos_token_id, pad_token_id=0, bos_token_id=1, seed=seed)


@register_model_builder("msd-digits-clip")
def digits_clip(width: int = 64, layers: int = 2, image_size: int = 16, patch_size: int = 4, seed: int = 0):
    """The demo's tiny transformers CLIP, sized for the caption tokenizer."""
    tokenizer = digit_caption_tokenizer()
    return digit_clip(len(tokenizer), tokenizer.eos_token_id, width=width, layers=layers, image_size=image_size,
                      patch_size=patch_size, seed=seed)


@register_data_builder("msd-digit-captions")
def digit_captions(student, teacher, image_size: int = 16, seed: int = 0):
    """Training split of the bundled digits, each image with a caption drawn from four templates."""
    train, labels, _, _ = load_digits_images(size=image_size, seed=seed)
    dataset = DigitCaptions(train, labels, digit_caption_tokenizer(), seed=seed)
    return dataset, dataset.collate
