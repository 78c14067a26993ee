"""Demo data and a tiny CLIP, all from images that ship with scikit-learn and scikit-image.

* `digits_task(language)` / `digits_images()`: scikit-learn's 8x8 digits upscaled, with English
  ("a photo of the digit seven.") and Chinese ("数字七的照片") prompts. The CLIP plugin demos use
  these for their zero-shot numbers.
* `object_crops` / `objects_task`: random crops of eight scikit-image sample photos (COCO layout).
* `object_mosaics` / `mosaics_task`: 2x2 mosaics of those crops, several objects per image
  (multi-label, 11-point mAP like VOC-2007).
* `train_tiny_clip`: a few hundred CPU steps of contrastive training of an open_clip model built
  from a small custom config, on English and Chinese captions of digits and object crops.
* `run_demo(out_dir)`: writes the datasets in ELEVATER formats, trains, and evaluates the trained
  and the untrained model through the same path as the command line.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmdistill.data.digits import DIGIT_NAMES_EN, DIGIT_NAMES_ZH, load_digits_arrays
from vlmdistill.extras import require

from ..tiny_models import open_clip_config
from .tasks import TaskSpec

DIGIT_NAMES = {"en": tuple(DIGIT_NAMES_EN), "zh": tuple(DIGIT_NAMES_ZH)}
DIGIT_TEMPLATES = {
    "en": ("a photo of the digit {}.", "a blurry photo of the digit {}.", "a drawing of the number {}."),
    "zh": ("数字{}的照片", "数字{}的模糊照片", "数字{}的图片"),
}
# (scikit-image loader, English name, Chinese name)
OBJECTS = (
    ("astronaut", "astronaut", "宇航员"),
    ("camera", "cameraman", "摄影师"),
    ("coffee", "cup of coffee", "咖啡"),
    ("chelsea", "cat", "猫"),
    ("rocket", "rocket", "火箭"),
    ("horse", "horse", "马"),
    ("coins", "coins", "硬币"),
    ("moon", "moon", "月亮"),
)
OBJECT_TEMPLATES = {
    "en": ("a photo of a {}.", "a cropped photo of a {}.", "a close-up photo of the {}."),
    "zh": ("{}的照片", "{}的局部照片", "{}的特写照片"),
}
TINY_CLIP_NAME = "vlmdistill-tiny-clip"
_TINY_CLIP_SIZE = dict(width=64, layers=2, patch=8, image_size=32, vocab=49408, context=32, embed_dim=64)
TINY_CLIP_CONFIG = open_clip_config("vit", **_TINY_CLIP_SIZE)


# ------------------------------------------------------------------ tasks

def digits_task(language: str = "en") -> TaskSpec:
    return TaskSpec(name="digits", classnames=DIGIT_NAMES[language], templates=DIGIT_TEMPLATES[language],
                    metric="accuracy", language=language)


def objects_task(language: str = "en") -> TaskSpec:
    names = tuple(o[1] if language == "en" else o[2] for o in OBJECTS)
    return TaskSpec(name="skimage-objects", classnames=names, templates=OBJECT_TEMPLATES[language],
                    metric="mean-per-class", language=language)


def mosaics_task(language: str = "en") -> TaskSpec:
    return TaskSpec(name="skimage-mosaics", classnames=objects_task(language).classnames,
                    templates=OBJECT_TEMPLATES[language], metric="11point_mAP", multilabel=True, language=language)


# ------------------------------------------------------------------ images

def digits_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 scikit-learn digits as RGB images of `size` pixels (white strokes on black), and labels."""
    arrays, labels = load_digits_arrays()
    pixels = (arrays / 16.0 * 255).astype(np.uint8)
    images = [Image.fromarray(p).resize((size, size), Image.BICUBIC).convert("RGB") for p in pixels]
    return images, labels.astype(np.int64)


def digits_split(size: int = 32, test_size: int = 500, seed: int = 0):
    """Stratified train/test split of the digits: ((train images, labels), (test images, labels))."""
    train_test_split = require("sklearn.model_selection", "the ELEVATER demo's split").train_test_split

    images, labels = digits_images(size)
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=test_size, stratify=labels,
                                           random_state=seed)
    pick = lambda idx: ([images[i] for i in idx], labels[idx])  # noqa: E731
    return pick(train_idx), pick(test_idx)


def digits_test_data(size: int = 32, test_size: int = 500, seed: int = 0):
    """The held-out digits as an in-memory dataset, ready for `evaluate_zero_shot` with `digits_task`.
    A model trained on `digits_split(...)[0]` with the same seed has never seen these images."""
    from .readers import from_images

    _, (images, labels) = digits_split(size, test_size, seed)
    return from_images(images, labels.tolist(), DIGIT_NAMES["en"], name="digits-test")


def _object_photo(loader: str) -> Image.Image:
    require("skimage.data", "the ELEVATER demo's object photos")
    import skimage.data

    array = getattr(skimage.data, loader)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


def _random_crop(photo: Image.Image, rng: random.Random, size: int) -> Image.Image:
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.45, 0.9))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def object_crops(per_class: int, size: int = 32, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    rng = random.Random(seed)
    photos = [_object_photo(o[0]) for o in OBJECTS]
    images, labels = [], []
    for label, photo in enumerate(photos):
        for _ in range(per_class):
            images.append(_random_crop(photo, rng, size))
            labels.append(label)
    return images, np.array(labels, dtype=np.int64)


def object_mosaics(count: int, size: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[tuple[int, ...]]]:
    """2x2 mosaics of crops of 2-3 distinct objects (a tile may repeat an object already present)."""
    rng = random.Random(seed)
    photos = [_object_photo(o[0]) for o in OBJECTS]
    half = size // 2
    images, labels = [], []
    for _ in range(count):
        present = rng.sample(range(len(OBJECTS)), rng.randint(2, 3))
        tiles = present + [rng.choice(present) for _ in range(4 - len(present))]
        rng.shuffle(tiles)
        mosaic = Image.new("RGB", (size, size))
        for position, label in enumerate(tiles):
            mosaic.paste(_random_crop(photos[label], rng, half), ((position % 2) * half, (position // 2) * half))
        images.append(mosaic)
        labels.append(tuple(sorted(set(present))))
    return images, labels


# ------------------------------------------------------------------ model

def build_tiny_clip(seed: int = 0):
    """A randomly initialised open_clip model from `TINY_CLIP_CONFIG`, and its tokenizer."""
    import open_clip

    from ..tiny_models import tiny_open_clip

    model, name = tiny_open_clip("vit", seed=seed, name=TINY_CLIP_NAME, **_TINY_CLIP_SIZE)
    return model, open_clip.get_tokenizer(name)


def train_tiny_clip(model, tokenizer, images: Sequence[Image.Image], captions: Sequence[Sequence[str]],
                    groups: Sequence[int], *, steps: int = 400, batch_size: int = 128, lr: float = 2e-3,
                    seed: int = 0, progress: bool = True) -> list[float]:
    """Contrastive training on (image, caption) pairs; `captions[i]` lists the captions image i may
    draw from. Pairs of the same `groups` value (same class) count as positives of each other, so
    repeated captions in a batch do not contradict the loss. Returns the loss curve."""
    from tqdm.auto import tqdm

    from .adapters import OPENAI_MEAN, OPENAI_STD
    from .protocol import elevater_transform

    transform = elevater_transform(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple)
                                   else model.visual.image_size, OPENAI_MEAN, OPENAI_STD)
    pixels = torch.stack([transform(image) for image in images])
    unique = sorted({caption for options in captions for caption in options})
    tokens = tokenizer(unique)                                  # tokenised once, indexed per step
    row = {caption: i for i, caption in enumerate(unique)}
    options = [[row[caption] for caption in choices] for choices in captions]
    groups_t = torch.as_tensor(groups)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="training tiny CLIP", disable=not progress, leave=False):
        batch = torch.randperm(len(images), generator=generator)[:batch_size]
        flips = torch.rand(len(batch), generator=generator) < 0.5
        batch_pixels = torch.where(flips[:, None, None, None], pixels[batch].flip(-1), pixels[batch])
        texts = tokens[[rng.choice(options[i]) for i in batch.tolist()]]
        image_features = F.normalize(model.encode_image(batch_pixels), dim=-1)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        same = (groups_t[batch][:, None] == groups_t[batch][None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def training_set(size: int = 32, seed: int = 0):
    """Digits train split + object crops, each image with its English and Chinese captions."""
    (digit_images, digit_labels), _ = digits_split(size, seed=seed)
    crop_images, crop_labels = object_crops(per_class=80, size=size, seed=seed + 1)
    images = list(digit_images) + list(crop_images)
    captions, groups = [], []
    for label in digit_labels:
        captions.append([t.format(DIGIT_NAMES[lang][label]) for lang in ("en", "zh") for t in DIGIT_TEMPLATES[lang]])
        groups.append(int(label))
    for label in crop_labels:
        captions.append([t.format(OBJECTS[label][1 if lang == "en" else 2])
                         for lang in ("en", "zh") for t in OBJECT_TEMPLATES[lang]])
        groups.append(10 + int(label))
    return images, captions, groups


# ------------------------------------------------------------------ the demo

def build_demo_datasets(out_dir: str, size: int = 32, seed: int = 0) -> dict[str, str]:
    """ELEVATER-format test sets: digits (IRIS, zipped), objects (COCO json), mosaics (IRIS, multi-label),
    each with `label_cn.txt` for the Chinese run, plus `tasks.yaml` describing them. Returns name -> folder."""
    import yaml

    from .dataset_writers import write_coco, write_iris

    _, (digit_images, digit_labels) = digits_split(size, seed=seed)
    crops, crop_labels = object_crops(per_class=25, size=size, seed=seed + 100)
    mosaics, mosaic_labels = object_mosaics(200, size=size, seed=seed + 200)
    folders = {name: os.path.join(out_dir, name) for name in ("digits", "skimage-objects", "skimage-mosaics")}
    write_iris(folders["digits"], digit_images, [(int(x),) for x in digit_labels], DIGIT_NAMES["en"])
    write_coco(folders["skimage-objects"], crops, [(int(x),) for x in crop_labels], objects_task("en").classnames)
    write_iris(folders["skimage-mosaics"], mosaics, mosaic_labels, objects_task("en").classnames)
    tasks = {}
    for name, task in (("digits", digits_task), ("skimage-objects", objects_task), ("skimage-mosaics", mosaics_task)):
        english, chinese = task("en"), task("zh")
        with open(os.path.join(folders[name], "label_cn.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(chinese.classnames) + "\n")
        tasks[name] = {"classnames": list(english.classnames), "templates": list(english.templates),
                       "templates_zh": list(chinese.templates), "metric": english.metric,
                       "multilabel": english.multilabel}
    with open(os.path.join(out_dir, "tasks.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump({"tasks": tasks}, handle, allow_unicode=True, sort_keys=False)
    return folders


def run_demo(out_dir: str = "runs/elevater_demo", steps: int = 300, seed: int = 0, progress: bool = True) -> list[dict]:
    """Build the datasets, train the tiny CLIP, evaluate untrained and trained models in English
    (ELEVATER protocol) and Chinese (CN-CLIP protocol); write results, summary and chart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the model's matrices are tiny: a second thread costs more than it brings
    try:
        return _run_demo(out_dir, steps, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str, steps: int, seed: int, progress: bool) -> list[dict]:
    from safetensors.torch import save_file

    from .adapters import adapter_for
    from .report import plot_results, write_summary

    os.makedirs(out_dir, exist_ok=True)
    folders = build_demo_datasets(os.path.join(out_dir, "data"), seed=seed)
    model, tokenizer = build_tiny_clip(seed)
    untrained = adapter_for(model, tokenizer, name="tiny-clip-untrained")
    results = _evaluate_all(untrained, folders, out_dir, progress)

    images, captions, groups = training_set(seed=seed)
    started = time.perf_counter()
    losses = train_tiny_clip(model, tokenizer, images, captions, groups, steps=steps, seed=seed, progress=progress)
    train_seconds = time.perf_counter() - started
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, f"{TINY_CLIP_NAME}.json"), "w") as handle:
        json.dump(TINY_CLIP_CONFIG, handle, indent=2)
    trained = adapter_for(model, tokenizer, name="tiny-clip-trained",
                          pretrained=os.path.join(model_dir, "model.safetensors"))
    results += _evaluate_all(trained, folders, out_dir, progress)
    write_summary(results, out_dir)
    plot_results(results, os.path.join(out_dir, "zero_shot.png"), title="Tiny CLIP, zero-shot (demo data)")
    with open(os.path.join(out_dir, "training.json"), "w") as handle:
        json.dump({"steps": steps, "seconds": train_seconds, "first_loss": losses[0], "last_loss": losses[-1],
                   "train_images": len(images)}, handle, indent=2)
    return results


def _evaluate_all(model, folders: dict[str, str], out_dir: str, progress: bool) -> list[dict]:
    from .readers import read_dataset
    from .tasks import read_classnames_file
    from .report import write_result_json
    from .runner import evaluate_zero_shot

    tasks = {"digits": digits_task, "skimage-objects": objects_task, "skimage-mosaics": mosaics_task}
    results = []
    for name, folder in folders.items():
        data = read_dataset(folder, multilabel=tasks[name]("en").multilabel)
        for language, protocol in (("en", "elevater"), ("zh", "cnclip_zh")):
            spec = tasks[name](language)
            if language == "zh":   # the Chinese class names come with the data, as in the Chinese release
                spec = spec.with_classnames(read_classnames_file(os.path.join(folder, "label_cn.txt")), "zh")
            result = evaluate_zero_shot(model, spec, data, protocol, batch_size=128,
                                        cache_dir=os.path.join(out_dir, "classifier_cache"), progress=progress)
            write_result_json(result, os.path.join(out_dir, "results"))
            results.append(result)
    return results
