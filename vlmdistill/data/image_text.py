"""Image–text pairs for contrastive students (dcclip, msd): reading, preprocessing, batching.

Sources (`read_image_text_source`):
* an image folder with `metadata.jsonl` or `metadata.csv` (the `datasets` "imagefolder" layout: one row per image,
  a `file_name` column relative to the folder and a caption column);
* a folder written by `datasets`' `save_to_disk` (an `Image` column, or a column of image paths).
Webdataset shards stay the streaming path for large corpora (`vlmdistill.plugins.dcclip.data.ImageTextShards`).

Preprocessing follows the model, never a default that may not fit it (`image_transform_for`): the model's own
image processor (a local folder, e.g. the checkpoint folder) when there is one, else its config (input size;
mean/std of its family; open_clip's `preprocess_cfg`). When the teacher preprocesses differently (a SigLIP teacher
of a CLIP student), samples carry `teacher_pixel_values` as well.

Batches hold tensors only (sample keys as fixed-width UTF-8 bytes, ids padded to a fixed length when asked), so
accelerate can dispatch them from one process, and `ImageTextPairs` is map-style, so a distributed sampler gives
every process its own part of each epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..recipes import register_data_builder
from .image_stats import HALF_MEAN_STD, OPENAI_MEAN, OPENAI_STD

Style = Literal["hf", "open_clip"]
#: width of the byte rows a batch stores sample keys in (UTF-8, zero padded)
KEY_BYTES = 128
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# transformers model_type -> (mean, std, resize mode) when no image processor is at hand
_FAMILY_PREPROCESSING = {
    "clip": (OPENAI_MEAN, OPENAI_STD, "shortest"), "altclip": (OPENAI_MEAN, OPENAI_STD, "shortest"),
    "chinese_clip": (OPENAI_MEAN, OPENAI_STD, "shortest"), "siglip": (HALF_MEAN_STD, HALF_MEAN_STD, "squash"),
    "siglip2": (HALF_MEAN_STD, HALF_MEAN_STD, "squash"),
    # vision towers of a VisionTextDualEncoderModel
    "clip_vision_model": (OPENAI_MEAN, OPENAI_STD, "shortest"),
    "siglip_vision_model": (HALF_MEAN_STD, HALF_MEAN_STD, "squash"),
}
_RESIZE_MODES = ("shortest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


# --------------------------------------------------------------------------- image preprocessing

def _stable_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{seed}".encode(), digest_size=4).digest(), "little")


def seeded_crop_box(image: Image.Image, key: str, seed: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop drawn from (sample key, augmentation seed): the same
    view for every model that sees the sample, and again when a teacher-feature cache is built."""
    from torchvision.transforms import RandomResizedCrop

    generator = torch.Generator().manual_seed(_stable_seed(key, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))


def _check_augment(augment: str) -> None:
    if augment not in ("none", "random_resized_crop"):
        raise ConfigError(f"augment={augment!r}; valid: ['none', 'random_resized_crop']")


class ClipImageTransform:
    """CLIP/ELEVATER test preprocessing (shorter side to `image_size`, bicubic; centre crop; normalise), or
    `resize_mode='squash'` (both sides to `image_size`, as SigLIP), or, with `augment='random_resized_crop'`, a
    crop drawn from a generator seeded by (sample key, augmentation seed) — so the teacher-feature cache can store
    the exact view."""

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD, *,
                 augment: Literal["none", "random_resized_crop"] = "none",
                 crop_scale: tuple[float, float] = (0.8, 1.0), resize_mode: str = "shortest",
                 interpolation: str = "bicubic") -> None:
        _check_augment(augment)
        if resize_mode not in _RESIZE_MODES:
            raise ConfigError(f"resize_mode={resize_mode!r}; valid: {list(_RESIZE_MODES)}")
        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation={interpolation!r}; valid: {list(_INTERPOLATIONS)}")
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.augment, self.crop_scale = augment, tuple(crop_scale)
        self.resize_mode, self.interpolation = resize_mode, interpolation

    def describe(self) -> dict[str, Any]:
        out = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
               "augment": self.augment, "crop_scale": list(self.crop_scale), "interpolation": self.interpolation}
        if self.resize_mode != "shortest":  # absent for the default, so existing fingerprints stay valid
            out["resize_mode"] = self.resize_mode
        return out

    @property
    def output_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def __call__(self, image: Image.Image, key: str = "", seed: int = 0) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        size = [self.image_size, self.image_size]
        image = image.convert("RGB")
        if self.augment == "random_resized_crop":
            top, left, h, w = seeded_crop_box(image, key, seed, self.crop_scale)
            image = TF.resized_crop(image, top, left, h, w, size, interpolation=mode)
        elif self.resize_mode == "squash":
            image = TF.resize(image, size, interpolation=mode)
        else:
            image = TF.resize(image, self.image_size, interpolation=mode)
            image = TF.center_crop(image, size)
        # to_tensor + normalize in one numpy pass (the same arithmetic, a fraction of the per-call overhead)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        return pixels.sub_(self._mean).div_(self._std)

    @property
    def _mean(self) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)

    @property
    def _std(self) -> torch.Tensor:
        return torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)


class ProcessorImageTransform:
    """A transformers image processor (the model's own preprocessing) as a `(image, key, seed) -> [3, H, W]`
    transform; `augment='random_resized_crop'` crops a seeded region first and lets the processor resize it."""

    def __init__(self, processor: Any, *, augment: str = "none", crop_scale: tuple[float, float] = (0.8, 1.0)):
        _check_augment(augment)
        self.processor, self.augment, self.crop_scale = processor, augment, tuple(crop_scale)
        self.output_size = tuple(self(Image.new("RGB", (37, 29)), "", 0).shape[-2:])

    def describe(self) -> dict[str, Any]:
        settings = json.loads(self.processor.to_json_string())
        return {"processor": type(self.processor).__name__, **settings, "augment": self.augment,
                "crop_scale": list(self.crop_scale)}

    def __call__(self, image: Image.Image, key: str = "", seed: int = 0) -> torch.Tensor:
        image = image.convert("RGB")
        if self.augment == "random_resized_crop":
            top, left, h, w = seeded_crop_box(image, key, seed, self.crop_scale)
            image = image.crop((left, top, left + w, top + h))
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0].float()


def model_folder(model: Any) -> Optional[str]:
    """The local folder a transformers model was loaded from (where its processor and tokenizer usually are)."""
    from ..hf import base_model

    path = getattr(getattr(base_model(model), "config", None), "_name_or_path", None)
    return path if isinstance(path, str) and path and os.path.isdir(path) else None


def is_open_clip_model(model: Any) -> bool:
    from ..hf import base_model

    inner = base_model(model)
    return type(inner).__module__.startswith("open_clip") and hasattr(inner, "visual")


def model_image_size(model: Any) -> Optional[tuple[int, int]]:
    """The input resolution a CLIP-style model's image tower is built for (None when it cannot be told)."""
    from ..hf import base_model

    inner = base_model(model)
    if is_open_clip_model(inner):
        size = inner.visual.image_size
    else:
        vision = getattr(getattr(inner, "config", None), "vision_config", None)
        size = getattr(vision, "image_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def load_image_processor(path: str) -> Any:
    from transformers import AutoImageProcessor

    from ..hf import from_local_folder

    return from_local_folder(AutoImageProcessor, path, role="image_processor")


def _has_image_processor(folder: Optional[str]) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, name))
                                      for name in ("preprocessor_config.json", "processor_config.json"))


def image_transform_for(model: Any, processor: Any = None, *, role: str = "student", augment: str = "none",
                        crop_scale: Sequence[float] = (0.8, 1.0), image_size: Optional[int] = None):
    """The preprocessing `model` expects. In order: `processor` (an image processor object or a local folder), an
    image processor saved in the model's own folder, the model's config (input size; family mean/std; open_clip's
    `preprocess_cfg`). Refuses a size that differs from the model's input size — the error a training run would
    otherwise hit at its first step."""
    from ..hf import base_model

    crop_scale = tuple(float(x) for x in crop_scale)
    expected = model_image_size(model)
    if processor is None and _has_image_processor(model_folder(model)):
        processor = model_folder(model)
    if processor is not None:
        if isinstance(processor, str):
            processor = load_image_processor(processor)
        processor = getattr(processor, "image_processor", processor)  # a full processor: its image part
        transform = ProcessorImageTransform(processor, augment=augment, crop_scale=crop_scale)
        where = f"its image processor ({type(processor).__name__})"
    else:
        inner = base_model(model)
        if is_open_clip_model(inner):
            cfg = dict(getattr(inner.visual, "preprocess_cfg", {}) or {})
            mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
            resize_mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
        else:
            config = getattr(inner, "config", None)
            model_type = getattr(config, "model_type", None)
            if model_type == "vision-text-dual-encoder":  # preprocessing is its vision tower's
                model_type = getattr(getattr(config, "vision_config", None), "model_type", model_type)
            if model_type not in _FAMILY_PREPROCESSING or expected is None:
                raise ConfigError(f"the {role} ({model_type or type(inner).__name__}) has no image processor in its "
                                  f"folder and no known default preprocessing; pass {role}'s image_processor= (a "
                                  f"local folder with preprocessor_config.json). Known families: "
                                  f"{sorted(_FAMILY_PREPROCESSING)}, open_clip")
            mean, std, resize_mode = _FAMILY_PREPROCESSING[model_type]
            interpolation = "bicubic"
        if resize_mode not in _RESIZE_MODES or interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"the {role}'s preprocess_cfg asks for resize_mode={resize_mode!r}, interpolation="
                              f"{interpolation!r}; supported: {list(_RESIZE_MODES)} x {list(_INTERPOLATIONS)}; pass "
                              "an image_processor instead")
        size = image_size if image_size is not None else (expected[0] if expected else None)
        if size is None:
            raise ConfigError(f"cannot tell the {role}'s input image size; set image_size")
        transform = ClipImageTransform(size, mean, std, augment=augment, crop_scale=crop_scale,
                                       resize_mode=resize_mode, interpolation=interpolation)
        where = "image_size" if image_size is not None else "its config"
    if expected is not None and tuple(transform.output_size) != tuple(expected):
        raise ConfigError(f"the {role} takes {expected[0]}x{expected[1]} images but {where} gives "
                          f"{transform.output_size[0]}x{transform.output_size[1]}; leave image_size unset to use the "
                          f"{role}'s own size")
    return transform


# --------------------------------------------------------------------------- text

def tokenize_caption(tokenizer: Any, caption: str, *, style: Style = "hf", max_length: Optional[int] = None):
    """Token ids of one caption: open_clip tokenizers give their fixed-length row; transformers tokenizers the
    ids up to `max_length` (the backend is called directly when it can be: no per-call wrapper overhead)."""
    if style == "open_clip":
        return tokenizer([caption])[0]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    remembered = getattr(backend, "truncation", None)  # set by an earlier call of the wrapper
    if backend is not None and not backend.padding and (remembered is None or
                                                         remembered.get("max_length") == max_length):
        ids = backend.encode(caption).ids
        if max_length is None or len(ids) <= max_length:
            return torch.tensor(ids, dtype=torch.long)
    ids = tokenizer(caption, truncation=max_length is not None, max_length=max_length)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_max_length(model: Any, tokenizer: Any) -> Optional[int]:
    """Longest caption the text tower takes: its position table (AltCLIP: minus XLM-R's offset of 2), capped by
    the tokenizer's `model_max_length`; open_clip: its context length."""
    from ..hf import base_model

    inner = base_model(model)
    if is_open_clip_model(inner):
        return int(getattr(inner, "context_length", 0) or 0) or None
    config = getattr(inner, "config", None)
    text = getattr(config, "text_config", None)
    positions = getattr(text, "max_position_embeddings", None)
    if positions and getattr(config, "model_type", None) == "altclip":
        positions -= 2
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    limits = [x for x in (positions, tokenizer_max) if x and x < 10**6]  # an unset model_max_length is huge
    return min(limits) if limits else None


def load_text_tokenizer(model: Any, path: Any, *, role: str):
    """A transformers tokenizer from a local folder (default: the model's own folder); open_clip models take
    open_clip's bundled BPE tokenizer (`None` or 'open_clip') or a transformers folder for HF text towers.
    A tokenizer object (what a recipe found in the model's folder) is used as it is."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        return path
    if is_open_clip_model(model):
        import open_clip

        context = int(getattr(model, "context_length", 77))
        if path in (None, "open_clip"):
            return open_clip.tokenizer.SimpleTokenizer(context_length=context)
        if not os.path.isdir(path):
            raise ConfigError(f"{role} tokenizer {path!r} is not a local folder (nothing is downloaded)")
        return open_clip.tokenizer.HFTokenizer(path, context_length=context)
    path = path or model_folder(model)
    if path is None:
        raise ConfigError(f"the {role} needs a tokenizer: set tokenizer= to a local tokenizer folder")
    from transformers import AutoTokenizer

    from ..hf import from_local_folder

    return from_local_folder(AutoTokenizer, path, role=f"{role} tokenizer")


# --------------------------------------------------------------------------- sample keys

def encode_keys(keys: Sequence[str], width: int = KEY_BYTES) -> torch.Tensor:
    """`[B, width]` uint8 rows of UTF-8 sample keys, zero padded: a tensor, so batches can be broadcast."""
    out = torch.zeros(len(keys), width, dtype=torch.uint8)
    for row, key in enumerate(keys):
        raw = str(key).encode("utf-8")
        if len(raw) > width or b"\0" in raw:
            raise DataError(f"sample key {key!r} is longer than {width} UTF-8 bytes or holds a NUL byte")
        out[row, :len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def decode_keys(rows: torch.Tensor) -> list[str]:
    """Inverse of `encode_keys`."""
    data = rows.detach().to("cpu", torch.uint8).numpy()
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in data]


# --------------------------------------------------------------------------- batching

def _pad(rows: list[torch.Tensor], pad_id: int, length: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(r) for r in rows]
    width = max(max(lengths), length or 0)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :lengths[i]] = torch.as_tensor(row)
        mask[i, :lengths[i]] = 1
    return ids, mask


class ImageTextCollator:
    """Stacks pixels, pads token ids (right padding, `attention_mask`; to `pad_to` when set, so every batch has
    one width), stores `sample_key` as `[B, KEY_BYTES]` bytes (`decode_keys`) and `augmentation_seed` as a tensor.
    English and Chinese captions mix freely: the tokenizer has already turned both into ids. Teacher columns
    (`teacher_pixel_values`, `teacher_input_ids` + mask) are batched the same way. `keep_metadata` adds the
    `language` and `caption` lists (for per-language bookkeeping; drop them before calling a model)."""

    def __init__(self, pad_token_id: int = 0, *, style: Style = "hf", keep_metadata: bool = False,
                 pad_to: Optional[int] = None, teacher_pad_token_id: Optional[int] = None,
                 teacher_style: Style = "hf", teacher_pad_to: Optional[int] = None,
                 key_bytes: int = KEY_BYTES) -> None:
        self.pad_token_id, self.style, self.keep_metadata = int(pad_token_id), style, keep_metadata
        self.pad_to, self.teacher_pad_to, self.key_bytes = pad_to, teacher_pad_to, key_bytes
        self.teacher_pad_token_id = self.pad_token_id if teacher_pad_token_id is None else int(teacher_pad_token_id)
        self.teacher_style = teacher_style

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise DataError("empty batch")
        pixel_key, ids_key = ("pixel_values", "input_ids") if self.style == "hf" else ("image", "text")
        first = samples[0]
        batch: dict[str, Any] = {pixel_key: torch.stack([s[pixel_key] for s in samples])}
        if self.style == "hf":
            batch["input_ids"], batch["attention_mask"] = _pad([s[ids_key] for s in samples], self.pad_token_id,
                                                               self.pad_to)
        else:
            batch["text"] = torch.stack([torch.as_tensor(s[ids_key]) for s in samples])
        if "teacher_pixel_values" in first:
            batch["teacher_pixel_values"] = torch.stack([s["teacher_pixel_values"] for s in samples])
        if "teacher_input_ids" in first:
            rows = [s["teacher_input_ids"] for s in samples]
            if self.teacher_style == "hf":
                batch["teacher_input_ids"], batch["teacher_attention_mask"] = _pad(rows, self.teacher_pad_token_id,
                                                                                   self.teacher_pad_to)
            else:
                batch["teacher_input_ids"] = torch.stack([torch.as_tensor(r) for r in rows])
        if "sample_key" in first:
            batch["sample_key"] = encode_keys([s["sample_key"] for s in samples], self.key_bytes)
        if "augmentation_seed" in first:
            batch["augmentation_seed"] = torch.tensor([int(s["augmentation_seed"]) for s in samples])
        for name in ("language", "caption") if self.keep_metadata else ():
            if name in first:
                batch[name] = [s.get(name) for s in samples]
        return batch


# --------------------------------------------------------------------------- sources

class ImageTextSource:
    """Rows of (key, image, caption, language) with their origin for error messages; `image` is a file path,
    a PIL image, or encoded bytes."""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> tuple[str, Any, str, Optional[str]]:
        raise NotImplementedError

    def where(self, index: int) -> str:
        raise NotImplementedError


def _column_error(what: str, column: str, available: Sequence[str], where: str, option: str) -> DataError:
    return DataError(f"{where}: no {what} column {column!r} (columns: {sorted(available)}); set {option}")


class MetadataFolder(ImageTextSource):
    """An image folder described by `metadata.jsonl` or `metadata.csv` (`file_name` relative to the folder)."""

    def __init__(self, folder: str, *, image_column: str = "file_name", text_column: str = "text",
                 language_column: Optional[str] = None, key_column: Optional[str] = None) -> None:
        names = [n for n in METADATA_FILES if os.path.isfile(os.path.join(folder, n))]
        if not names:
            raise DataError(f"{folder} has no {' or '.join(METADATA_FILES)}")
        self.folder, self.path = folder, os.path.join(folder, names[0])
        self.rows = self._read(self.path)
        if not self.rows:
            raise DataError(f"{self.path} lists no images")
        language_column = language_column or ("language" if "language" in self.rows[0] else None)
        self.columns = (image_column, text_column, language_column, key_column)
        seen: dict[str, int] = {}
        for index, row in enumerate(self.rows):
            where = self.where(index)
            for column, option in ((image_column, "image_column"), (text_column, "text_column"),
                                   (language_column, "language_column"), (key_column, "key_column")):
                if column is not None and column not in row:
                    raise _column_error(option.split("_")[0], column, row, where, option)
            if not isinstance(row[text_column], str):
                raise DataError(f"{where}: the caption ({text_column!r}) is not a string: {row[text_column]!r}")
            image = os.path.join(folder, str(row[image_column]))
            if not os.path.isfile(image):
                raise DataError(f"{where}: image file {image} does not exist")
            key = str(row[key_column]) if key_column else str(row[image_column])
            if key in seen:
                raise DataError(f"{where}: sample key {key!r} repeats {self.where(seen[key])}")
            seen[key] = index

    def _read(self, path: str) -> list[dict]:
        rows = []
        with open(path, encoding="utf-8", newline="") as fh:
            if path.endswith(".csv"):
                return list(csv.DictReader(fh))
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        return f"{self.path} record {index}"

    def record(self, index: int):
        image_column, text_column, language_column, key_column = self.columns
        row = self.rows[index]
        key = str(row[key_column]) if key_column else str(row[image_column])
        language = str(row[language_column]) if language_column else None
        return key, os.path.join(self.folder, str(row[image_column])), row[text_column], language


class ArrowImageText(ImageTextSource):
    """A `datasets.Dataset` (from `save_to_disk`): an `Image` column, or a column of paths (relative to
    `image_root`, default the dataset folder)."""

    def __init__(self, dataset: Any, origin: str, *, image_column: str = "image", text_column: str = "text",
                 language_column: Optional[str] = None, key_column: Optional[str] = None,
                 image_root: Optional[str] = None) -> None:
        import datasets

        self.dataset, self.origin = dataset, origin
        names = dataset.column_names
        language_column = language_column or ("language" if "language" in names else None)
        for column, option in ((image_column, "image_column"), (text_column, "text_column"),
                               (language_column, "language_column"), (key_column, "key_column")):
            if column is not None and column not in names:
                raise _column_error(option.split("_")[0], column, names, origin, option)
        if len(dataset) == 0:
            raise DataError(f"{origin} holds no rows")
        self.columns = (image_column, text_column, language_column, key_column)
        feature = dataset.features[image_column]
        self.paths = not isinstance(feature, datasets.Image)
        self.image_root = image_root if image_root is not None else (origin if os.path.isdir(origin) else ".")
        if self.paths:
            for index, path in enumerate(dataset[image_column]):
                full = os.path.join(self.image_root, str(path))
                if not isinstance(path, str) or not os.path.isfile(full):
                    raise DataError(f"{self.where(index)}: image file {full} does not exist")
        if key_column is not None:
            keys = [str(k) for k in dataset[key_column]]
            if len(set(keys)) != len(keys):
                raise DataError(f"{origin}: the key column {key_column!r} repeats keys")

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        return f"{self.origin} record {index}"

    def record(self, index: int):
        image_column, text_column, language_column, key_column = self.columns
        row = self.dataset[index]
        image = row[image_column]
        if self.paths:
            image = os.path.join(self.image_root, str(image))
        key = str(row[key_column]) if key_column else str(index)
        language = str(row[language_column]) if language_column else None
        return key, image, row[text_column], language


def read_image_text_source(path: str, *, image_column: Optional[str] = None, text_column: str = "text",
                           language_column: Optional[str] = None, key_column: Optional[str] = None,
                           split: str = "train", image_root: Optional[str] = None) -> ImageTextSource:
    """An image folder with `metadata.jsonl` / `metadata.csv`, or a `save_to_disk` folder (a `DatasetDict`:
    its `split`). Columns: images (`file_name` / `image`), captions (`text`), an optional language (a `language`
    column is used when there is one), optional keys (default: the file name, or the row index)."""
    if not os.path.isdir(path):
        raise DataError(f"image-text data {path!r} is not a folder (an image folder with "
                        f"{' or '.join(METADATA_FILES)}, or a datasets save_to_disk folder)")
    if any(os.path.isfile(os.path.join(path, n)) for n in METADATA_FILES):
        return MetadataFolder(path, image_column=image_column or "file_name", text_column=text_column,
                              language_column=language_column, key_column=key_column)
    saved = [n for n in ("dataset_dict.json", "state.json") if os.path.isfile(os.path.join(path, n))]
    if not saved:
        raise DataError(f"{path} holds neither {' nor '.join(METADATA_FILES)} nor a datasets save_to_disk dataset "
                        "(dataset_dict.json / state.json)")
    import datasets

    loaded = datasets.load_from_disk(path)
    origin = path
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits: {sorted(loaded)}")
        loaded, origin = loaded[split], f"{path} [{split}]"
    return ArrowImageText(loaded, origin, image_column=image_column or "image", text_column=text_column,
                          language_column=language_column, key_column=key_column, image_root=image_root)


# --------------------------------------------------------------------------- the dataset

class ImageTextPairs(torch.utils.data.Dataset):
    """Map-style image–text pairs, preprocessed and tokenised in the student's own input names (`pixel_values`/
    `input_ids`, open_clip: `image`/`text`), with `sample_key` and `augmentation_seed` (the keys of dcclip's
    teacher-feature cache) and, when given, the teacher's own pixels / ids."""

    def __init__(self, source: ImageTextSource, transform: Any, tokenizer: Any, *, style: Style = "hf",
                 max_length: Optional[int] = None, augmentation_seeds: int = 1, teacher_transform: Any = None,
                 teacher_tokenizer: Any = None, teacher_style: Style = "hf",
                 teacher_max_length: Optional[int] = None) -> None:
        if style not in ("hf", "open_clip"):
            raise ConfigError(f"style={style!r}; valid: ['hf', 'open_clip']")
        self.source, self.transform, self.tokenizer, self.style = source, transform, tokenizer, style
        self.max_length, self.augmentation_seeds = max_length, max(int(augmentation_seeds), 1)
        self.teacher_transform, self.teacher_tokenizer = teacher_transform, teacher_tokenizer
        self.teacher_style, self.teacher_max_length = teacher_style, teacher_max_length
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Picks the augmentation seed (epoch mod augmentation_seeds)."""
        self.epoch = int(epoch)

    def fingerprint(self) -> str:
        """Hash of everything that changes what the teacher sees: preprocessing, tokenizer, seeds."""
        from ..vocab import tokenizer_identity

        def describe(transform):
            return transform.describe() if hasattr(transform, "describe") else repr(transform)

        payload = {"transform": describe(self.transform), "tokenizer": tokenizer_identity(self.tokenizer),
                   "style": self.style, "max_length": self.max_length,
                   "augmentation_seeds": self.augmentation_seeds}
        if self.teacher_transform is not None:
            payload["teacher_transform"] = describe(self.teacher_transform)
        if self.teacher_tokenizer is not None:
            payload["teacher_tokenizer"] = tokenizer_identity(self.teacher_tokenizer)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def _image(self, image: Any, index: int) -> Image.Image:
        try:
            if isinstance(image, Image.Image):
                return image
            if isinstance(image, dict):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
                image = image.get("bytes") or image.get("path")
            opened = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)
            opened.load()
            return opened
        except Exception as exc:  # noqa: BLE001 - any failure to read the image is a data error of this record
            name = image if isinstance(image, str) else "the stored image"
            raise DataError(f"{self.source.where(index)}: cannot read {name} ({type(exc).__name__}: {exc})") from exc

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, image, caption, language = self.source.record(index)
        image = self._image(image, index)
        seed = self.epoch % self.augmentation_seeds
        pixel_key, ids_key = ("pixel_values", "input_ids") if self.style == "hf" else ("image", "text")
        item = {pixel_key: self.transform(image, key, seed),
                ids_key: tokenize_caption(self.tokenizer, caption, style=self.style, max_length=self.max_length),
                "sample_key": key, "augmentation_seed": seed, "caption": caption}
        if language is not None:
            item["language"] = language
        if self.teacher_transform is not None:
            item["teacher_pixel_values"] = self.teacher_transform(image, key, seed)
        if self.teacher_tokenizer is not None:
            item["teacher_input_ids"] = tokenize_caption(self.teacher_tokenizer, caption, style=self.teacher_style,
                                                         max_length=self.teacher_max_length)
        return item


def teacher_text_tokenizer(teacher: Any, path: Any, student_tokenizer: Any, style: Style, teacher_style: Style,
                           student_folder: Optional[str]) -> tuple[Any, Any]:
    """(the teacher's tokenizer when it is known, the same when it tokenises differently from the student).

    Known: the one given (`path`: a folder or a tokenizer object), or the one saved in the teacher's own folder,
    or open_clip's for an open_clip teacher. Unknown is None, never the student's tokenizer in its place: the
    plugin then checks what it can (vocabulary sizes) rather than comparing the student's tokenizer with itself."""
    from ..vocab import tokenizer_identity

    folder = model_folder(teacher)
    in_folder = folder is not None and os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    if path is None and not in_folder and teacher_style == style:
        return None, None
    if path is None and in_folder and folder == student_folder:
        return student_tokenizer, None
    found = load_text_tokenizer(teacher, path, role="teacher")
    differs = teacher_style != style or tokenizer_identity(found) != tokenizer_identity(student_tokenizer)
    return found, (found if differs else None)


@register_data_builder("image-text")
def build_image_text(student: Any, teacher: Any, path: str, tokenizer: Any = None, *,
                     image_processor: Any = None, teacher_image_processor: Any = None, teacher_tokenizer: Any = None,
                     image_column: Optional[str] = None, text_column: str = "text",
                     language_column: Optional[str] = None, key_column: Optional[str] = None, split: str = "train",
                     image_root: Optional[str] = None, max_length: Optional[int] = None,
                     image_size: Optional[int] = None, augment: str = "none",
                     crop_scale: Sequence[float] = (0.8, 1.0), augmentation_seeds: int = 1):
    """(dataset, collator, wrap kwargs) of image–text pairs for `student` (and `teacher`, when it preprocesses
    differently). Tokenizer and image processor default to those saved in the model's folder; the wrap kwargs
    carry the tokenizers and the data fingerprint (dcclip checks its teacher-feature cache with it)."""
    style: Style = "open_clip" if is_open_clip_model(student) else "hf"
    source = read_image_text_source(path, image_column=image_column, text_column=text_column,
                                    language_column=language_column, key_column=key_column, split=split,
                                    image_root=image_root)
    tok = load_text_tokenizer(student, tokenizer, role="student")
    length = max_length or text_max_length(student, tok)
    transform = image_transform_for(student, image_processor, role="student", augment=augment,
                                    crop_scale=crop_scale, image_size=image_size)
    t_transform = t_tok = t_known = None
    t_style: Style = "hf"
    t_length = length
    if isinstance(teacher, torch.nn.Module):
        candidate = image_transform_for(teacher, teacher_image_processor, role="teacher", augment=augment,
                                        crop_scale=crop_scale)
        if candidate.describe() != transform.describe():  # the teacher sees its own view of the same crop
            t_transform = candidate
        t_style = "open_clip" if is_open_clip_model(teacher) else "hf"
        t_known, t_tok = teacher_text_tokenizer(teacher, teacher_tokenizer, tok, style, t_style, model_folder(student))
        t_length = text_max_length(teacher, t_tok) if t_tok is not None else length
    dataset = ImageTextPairs(source, transform, tok, style=style, max_length=length,
                             augmentation_seeds=augmentation_seeds, teacher_transform=t_transform,
                             teacher_tokenizer=t_tok, teacher_style=t_style, teacher_max_length=t_length)
    pad_id = getattr(tok, "pad_token_id", None) or 0
    t_pad = getattr(t_tok, "pad_token_id", None) if t_tok is not None else None
    collator = ImageTextCollator(pad_id, style=style, pad_to=length, teacher_pad_token_id=t_pad,
                                 teacher_style=t_style, teacher_pad_to=t_length)
    runtime = {"student_tokenizer": tok, "data_fingerprint": dataset.fingerprint()}
    if t_known is not None:  # the teacher's own; never the student's in its place
        runtime["teacher_tokenizer"] = t_known
    return dataset, collator, runtime
