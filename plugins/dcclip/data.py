"""Image–text webdataset shards of (image, caption, language): writer and reader (the collator, the image
transform and map-style image folders live in `vlmdistill.data.image_text`).

Each sample is `<key>.png` (or `.jpg`), `<key>.txt` (the caption, UTF-8) and `<key>.lang` (`en`/`zh`).
`shards.json` beside the shards lists each shard with its sample count, so a reader can say how many
samples a broken shard cost.

The reader tokenises per sample and emits the student's own input names (`pixel_values`/`input_ids`
for transformers models, `image`/`text` for open_clip), plus `sample_key` and `augmentation_seed` (the
keys of the teacher-feature cache). The HF Trainer drops every column the model does not take
*before* collation, which is why nothing the collator needs may live only in the caption.

Several processes: under the HF Trainer / accelerate, every process reads the same stream and accelerate
hands each its part (its slice of every global batch, or rank 0 reads and dispatches), so the reader must
not split shards by rank as well — that would leave each process 1/W² of the data. `split_by_node=True`
is for hand-written loops with one plain DataLoader per process: each process then reads only its shards.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from vlmdistill.data.image_text import (ClipImageTransform, ImageTextCollator,  # noqa: F401 (re-exported)
                                        Style, tokenize_caption)
from vlmdistill.errors import ConfigError, DataError
from vlmdistill.extras import require

logger = logging.getLogger("vlmdistill.dcclip.data")

LANGUAGES = ("en", "zh")
SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "vlmdistill.dcclip.image_text"


@dataclasses.dataclass
class ImageTextSample:
    key: str
    image: Any          # PIL image, uint8 HxW(x3) array, or encoded image bytes
    caption: str
    language: str


def _encode_image(image: Any, image_format: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise DataError(f"cannot store an image of type {type(image).__name__}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG" if image_format == "png" else "JPEG")
    return buffer.getvalue()


def write_image_text_shards(samples: Iterable[ImageTextSample], directory: str, *, samples_per_shard: int = 1000,
                            image_format: Literal["png", "jpg"] = "png") -> str:
    """Write `shard-00000.tar`, ... and `shards.json`; returns the manifest path."""
    wds = require("webdataset", "writing webdataset shards")

    os.makedirs(directory, exist_ok=True)
    counts: collections.Counter = collections.Counter()
    languages: collections.Counter = collections.Counter()
    seen: set[str] = set()
    with wds.ShardWriter(os.path.join(directory, "shard-%05d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for sample in samples:
            if not sample.key or any(c in sample.key for c in "./\\ "):
                raise DataError(f"sample key {sample.key!r}: keys may not be empty or contain '.', '/', spaces")
            if sample.key in seen:
                raise DataError(f"sample key {sample.key!r} appears twice")
            if sample.language not in LANGUAGES:
                raise DataError(f"sample {sample.key!r}: language {sample.language!r} is not one of {LANGUAGES}")
            seen.add(sample.key)
            sink.write({"__key__": sample.key, image_format: _encode_image(sample.image, image_format),
                        "txt": sample.caption.encode("utf-8"), "lang": sample.language.encode("utf-8")})
            counts[sink.shard - 1] += 1  # ShardWriter numbers the shard it writes to as .shard - 1
            languages[sample.language] += 1
    manifest = {"format": SHARDS_FORMAT, "num_samples": sum(counts.values()), "languages": dict(languages),
                "shards": [{"file": f"shard-{i:05d}.tar", "count": counts[i]} for i in sorted(counts)]}
    path = os.path.join(directory, SHARDS_MANIFEST)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return path


def read_shard_manifest(directory: str) -> dict:
    path = os.path.join(directory, SHARDS_MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{directory} has no {SHARDS_MANIFEST}; write shards with write_image_text_shards or pass "
                        "a list of .tar files")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- reading

@dataclasses.dataclass
class LoaderStats:
    """What one pass over the shards delivered and lost (per process / per DataLoader worker)."""

    samples: int = 0
    skipped_samples: int = 0
    failed_shards: dict[str, str] = dataclasses.field(default_factory=dict)
    per_shard: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class ImageTextShards(torch.utils.data.IterableDataset):
    """Samples of image–text shards, decoded, transformed and tokenised.

    source: a directory with `shards.json`, or a list of `.tar` paths.
    split_by_node: each distributed process reads only its share of the shards (plain loops; leave it off
    under the HF Trainer / accelerate, which split the stream themselves).
    teacher_transform: the teacher's own preprocessing, when it differs (samples then carry
    `teacher_pixel_values`, the same crop seen the teacher's way).
    teacher_tokenizer: the teacher's own tokenizer, when it differs (samples then carry `teacher_input_ids`).
    on_error: 'skip' — a missing or corrupt shard, or an undecodable sample, is logged with its shard
    name and counted in `stats.skipped_samples`, and the pass goes on; 'stop' — raise `DataError`
    naming the shard.
    """

    def __init__(self, source: str | Sequence[str], transform: Callable, tokenizer: Any, *, style: Style = "hf",
                 max_length: int | None = None, shuffle_buffer: int = 0, shardshuffle: int | bool = False,
                 seed: int = 0, on_error: Literal["skip", "stop"] = "skip", augmentation_seeds: int = 1,
                 languages: Sequence[str] | None = None, split_by_node: bool = False,
                 teacher_transform: Callable | None = None, teacher_tokenizer: Any = None,
                 teacher_style: Style = "hf", teacher_max_length: int | None = None) -> None:
        super().__init__()
        if on_error not in ("skip", "stop"):
            raise ConfigError(f"on_error={on_error!r}; valid: ['skip', 'stop']")
        if style not in ("hf", "open_clip"):
            raise ConfigError(f"style={style!r}; valid: ['hf', 'open_clip']")
        if isinstance(source, str):
            manifest = read_shard_manifest(source)
            self.urls = [os.path.join(source, s["file"]) for s in manifest["shards"]]
            self.expected = {url: s["count"] for url, s in zip(self.urls, manifest["shards"])}
        else:
            self.urls, self.expected = [str(u) for u in source], {}
        if not self.urls:
            raise DataError(f"no shards in {source!r}")
        self.transform, self.tokenizer, self.style, self.max_length = transform, tokenizer, style, max_length
        self.shuffle_buffer, self.shardshuffle, self.seed = int(shuffle_buffer), shardshuffle, int(seed)
        self.on_error, self.augmentation_seeds = on_error, max(int(augmentation_seeds), 1)
        self.languages = set(languages) if languages else None
        self.split_by_node = bool(split_by_node)
        self.teacher_transform = teacher_transform
        self.teacher_tokenizer, self.teacher_style = teacher_tokenizer, teacher_style
        self.teacher_max_length = teacher_max_length
        self.epoch = 0
        self.stats = LoaderStats()

    def set_epoch(self, epoch: int) -> None:
        """Picks the augmentation seed (epoch mod augmentation_seeds) and the shuffle order."""
        self.epoch = int(epoch)

    def fingerprint(self) -> str:
        """Hash of everything that changes what the teacher sees: preprocessing, tokenizer, seeds."""
        from vlmdistill.vocab import tokenizer_identity

        describe = getattr(self.transform, "describe", None)
        payload = {"transform": describe() if callable(describe) else repr(self.transform),
                   "tokenizer": tokenizer_identity(self.tokenizer), "style": self.style,
                   "max_length": self.max_length, "augmentation_seeds": self.augmentation_seeds}
        if self.teacher_transform is not None:
            payload["teacher_transform"] = self.teacher_transform.describe()
        if self.teacher_tokenizer is not None:
            payload["teacher_tokenizer"] = tokenizer_identity(self.teacher_tokenizer)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    # ------------------------------------------------------------------ errors
    def _shard_of(self, exn: BaseException) -> str:
        for arg in reversed(getattr(exn, "args", ())):
            if isinstance(arg, str) and (arg in self.expected or arg.endswith(".tar")):
                return arg
        text = str(exn)
        return next((u for u in self.urls if u in text), "<unknown shard>")

    def _handle(self, exn: BaseException) -> bool:
        shard = self._shard_of(exn)
        message = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        if self.on_error == "stop":
            raise DataError(f"image-text shard {shard} is unreadable ({message}); on_error='skip' would skip it") \
                from exn
        logger.warning("skipping unreadable image-text shard %s (%s)", shard, message)
        self.stats.failed_shards[shard] = message
        return True

    def _decode_failed(self, shard: str, key: str, exn: BaseException) -> None:
        message = f"sample {key!r} in shard {shard} cannot be decoded ({type(exn).__name__}: {exn})"
        if self.on_error == "stop":
            raise DataError(message) from exn
        logger.warning("skipping %s", message)
        self.stats.skipped_samples += 1

    # ------------------------------------------------------------------ samples
    def _tokenize(self, caption: str) -> torch.Tensor:
        return tokenize_caption(self.tokenizer, caption, style=self.style, max_length=self.max_length)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        image_bytes = raw.get("png", raw.get("jpg", raw.get("jpeg")))
        if image_bytes is None or "txt" not in raw:
            raise DataError(f"sample has no image or caption (members: {sorted(k for k in raw if k[:2] != '__')})")
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        language = raw["lang"].decode("utf-8") if "lang" in raw else "en"
        return {"image": image, "caption": raw["txt"].decode("utf-8"), "language": language}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wds = require("webdataset", "reading webdataset shards")

        self.stats = LoaderStats()
        seed = self.seed + self.epoch
        augmentation_seed = self.epoch % self.augmentation_seeds
        pipeline = wds.WebDataset(self.urls, shardshuffle=self.shardshuffle, seed=seed, handler=self._handle,
                                  nodesplitter=wds.split_by_node if self.split_by_node else _every_shard,
                                  empty_check=False)
        rng = random.Random(seed)
        stream = self._samples(pipeline, augmentation_seed)
        if self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        yield from stream
        for shard in self.stats.failed_shards:
            lost = self.expected.get(shard, 0) - self.stats.per_shard.get(shard, 0)
            self.stats.skipped_samples += max(lost, 0)
        if self.stats.failed_shards or self.stats.skipped_samples:
            logger.warning("image-text pass finished: %d samples delivered, %d skipped, unreadable shards: %s",
                           self.stats.samples, self.stats.skipped_samples, sorted(self.stats.failed_shards))

    def _samples(self, pipeline, augmentation_seed: int) -> Iterator[dict[str, Any]]:
        pixel_key, ids_key = ("pixel_values", "input_ids") if self.style == "hf" else ("image", "text")
        for raw in pipeline:
            key, shard = raw.get("__key__", "?"), raw.get("__url__", "<unknown shard>")
            try:
                decoded = self._decode(raw)
            except Exception as exn:  # noqa: BLE001 - any decoding failure is a data error of this sample
                self._decode_failed(shard, key, exn)
                continue
            if self.languages is not None and decoded["language"] not in self.languages:
                continue
            self.stats.per_shard[shard] += 1
            self.stats.samples += 1
            item = {pixel_key: self.transform(decoded["image"], key, augmentation_seed),
                    ids_key: self._tokenize(decoded["caption"]),
                    "sample_key": key, "augmentation_seed": augmentation_seed,
                    "caption": decoded["caption"], "language": decoded["language"]}
            if self.teacher_transform is not None:
                item["teacher_pixel_values"] = self.teacher_transform(decoded["image"], key, augmentation_seed)
            if self.teacher_tokenizer is not None:
                item["teacher_input_ids"] = tokenize_caption(self.teacher_tokenizer, decoded["caption"],
                                                             style=self.teacher_style,
                                                             max_length=self.teacher_max_length)
            yield item


def _every_shard(urls):
    """Node splitter that keeps every shard (accelerate splits the stream between processes itself)."""
    return urls


def _shuffled(stream: Iterable, size: int, rng: random.Random) -> Iterator:
    buffer: list = []
    for item in stream:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))
