"""Recipe builders for `vlmdistill train` and the `vlmdistill cache-teacher RECIPE` command.

* data builder `dcclip-image-text`: image–text webdataset shards (see `data.py`), preprocessed and
  tokenised for the student, with the `sample_key` / `augmentation_seed` columns the cache uses.

`cache_teacher_main` reads the same recipe as `vlmdistill train`, runs the teacher once over the
recipe's data (every augmentation seed) and writes the cache to `config.teacher_cache` (or `--output`).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from vlmdistill.errors import ConfigError
from vlmdistill.recipes import register_data_builder


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from vlmdistill.hf import from_local_folder

    return from_local_folder(AutoTokenizer, path, role="tokenizer")


@register_data_builder("dcclip-image-text")
def build_image_text(student, teacher, shards: str, tokenizer: str, image_size: Optional[int] = None,
                     max_length: int = 32, shuffle_buffer: int = 1000, shardshuffle: int = 4, seed: int = 0,
                     on_error: str = "skip", augment: str = "none", augmentation_seeds: int = 1,
                     mean: Optional[list[float]] = None, std: Optional[list[float]] = None,
                     image_processor: Optional[str] = None, teacher_image_processor: Optional[str] = None,
                     teacher_tokenizer: Any = None):
    """(dataset, collator, wrap kwargs) over image–text shards, in the student's own input names; the wrap
    kwargs give the plugin the student's tokenizer, the teacher's (when known: `teacher_tokenizer`, a folder, or
    the one saved in the teacher's folder, which recipes pass) and the data fingerprint its cache checks.

    Preprocessing is the student's (`image_processor`, else its config); `image_size` / `mean` / `std`
    override it, and a size the student cannot take is refused here rather than at the first step. A teacher
    that preprocesses otherwise (`teacher_image_processor`, else its folder or config) gets `teacher_pixel_values`,
    one that tokenises otherwise `teacher_input_ids`."""
    from torch import nn

    from vlmdistill.data.image_text import (ClipImageTransform, image_transform_for, is_open_clip_model,
                                            teacher_text_tokenizer, text_max_length)

    from .data import ImageTextCollator, ImageTextShards
    from .families import describe_model

    tok = _tokenizer(tokenizer)
    style = "open_clip" if describe_model(student, role="student").is_open_clip else "hf"
    transform = image_transform_for(student, image_processor, augment=augment, image_size=image_size)
    if mean is not None or std is not None:
        if not isinstance(transform, ClipImageTransform):
            raise ConfigError("mean / std override the config-derived preprocessing; with image_processor= they "
                              "come from the processor")
        transform = ClipImageTransform(transform.image_size, mean or transform.mean, std or transform.std,
                                       augment=augment, resize_mode=transform.resize_mode,
                                       interpolation=transform.interpolation)
    teacher_transform = t_known = t_tok = None
    t_style, t_length = "hf", max_length
    if isinstance(teacher, nn.Module):
        candidate = image_transform_for(teacher, teacher_image_processor, role="teacher", augment=augment)
        teacher_transform = candidate if candidate.describe() != transform.describe() else None
        t_style = "open_clip" if is_open_clip_model(teacher) else "hf"
        t_known, t_tok = teacher_text_tokenizer(teacher, teacher_tokenizer, tok, style, t_style, None)
        t_length = (text_max_length(teacher, t_tok) or max_length) if t_tok is not None else max_length
    dataset = ImageTextShards(shards, transform, tok, style=style, max_length=max_length,
                              shuffle_buffer=shuffle_buffer, shardshuffle=shardshuffle, seed=seed, on_error=on_error,
                              augmentation_seeds=augmentation_seeds, teacher_transform=teacher_transform,
                              teacher_tokenizer=t_tok, teacher_style=t_style, teacher_max_length=t_length)
    runtime = {"student_tokenizer": tok, "data_fingerprint": dataset.fingerprint()}
    if t_known is not None:  # the teacher's own tokenizer; never the student's in its place
        runtime["teacher_tokenizer"] = t_known
    collator = ImageTextCollator(tok.pad_token_id, style=style, pad_to=max_length,
                                 teacher_pad_token_id=getattr(t_tok, "pad_token_id", None) if t_tok else None,
                                 teacher_style=t_style, teacher_pad_to=t_length if t_tok is not None else None)
    return dataset, collator, runtime


def cache_teacher_main(argv: list[str] | None = None) -> int:
    """`vlmdistill cache-teacher RECIPE.yaml [--set key=value ...] [--output DIR]`"""
    import torch

    import vlmdistill
    from vlmdistill.recipes import ModelSpec, build, load_recipe

    parser = argparse.ArgumentParser(prog="vlmdistill cache-teacher",
                                     description="Precompute a recipe's teacher features for dcclip stage 1")
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--output", default=None, help="cache directory (default: the recipe's config.teacher_cache)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the features (float32 reproduces the live teacher exactly)")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.set)
    if recipe.plugin != "dcclip":
        raise ConfigError(f"{args.recipe}: cache-teacher is for plugin 'dcclip', the recipe uses {recipe.plugin!r}")
    if not isinstance(recipe.teacher, ModelSpec):
        raise ConfigError(f"{args.recipe}: the recipe needs a teacher model to cache its features")
    config = dict(recipe.config)
    output = args.output or config.get("teacher_cache")
    if not output:
        raise ConfigError("no cache directory: set config.teacher_cache in the recipe or pass --output")
    config.update(teacher_cache=None, stage=1, switch_at_step=None, switch_at_epoch=None)
    # the recipe's models and data, built as `vlmdistill train` builds them, so the cache matches the training
    built = build(recipe, eval_data=False)
    dataset, collator = built.train_dataset, built.data_collator
    wrapped = vlmdistill.wrap(built.student, plugin="dcclip", teacher=built.teacher, config=config,
                              **built.wrap_kwargs)

    def passes():
        for epoch in range(getattr(dataset, "augmentation_seeds", 1)):  # every augmentation the training will see
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            yield from torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator)

    manifest = wrapped.plugin.build_teacher_cache(passes(), output, samples_per_shard=args.samples_per_shard,
                                                  dtype=getattr(torch, args.dtype))
    stats = getattr(dataset, "stats", None)
    skipped = f", {stats.skipped_samples} samples skipped" if stats is not None and stats.skipped_samples else ""
    print(f"teacher features written: {manifest}{skipped}")
    return 0
