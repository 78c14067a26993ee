"""Text-recognition LMDBs: the format of the synthetic and real training sets (MJSynth, SynthText, the unlabeled
real sets) and of the six standard benchmarks (IIIT5K, SVT, IC13, IC15, SVTP, CUTE80), as written by
`create_lmdb_dataset.py` of the deep-text-recognition-benchmark and read by ABINet, PARSeq and CCD:

    num-samples      the number of samples N (ASCII integer)
    image-%09d       the encoded image (PNG, JPEG, ...) of sample i, 1-based
    label-%09d       its UTF-8 transcription (absent in unlabeled sets)

`TextImageLMDB` serves `pixel_values` (resized to the recogniser's size, normalised), `ccd_seed` (the sample index,
so that CCD's views of a sample do not depend on batching) and, for labelled sets, `text`. The `lmdb` package is an
optional dependency (`pip install vlmdistill[lmdb]`).
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import torch

from vlmdistill.data.image_stats import IMAGENET_MEAN, IMAGENET_STD
from vlmdistill.errors import DataError
from vlmdistill.extras import require

#: the usual 36-character protocol of scene-text benchmarks: case-insensitive, letters and digits only
CHARSET_36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def normalise_label(text: str, charset: str = CHARSET_36) -> str:
    """The 36-character protocol: lower-cased, every character outside `charset` dropped."""
    allowed = set(charset)
    return "".join(c for c in text.lower() if c in allowed)


def _lmdb():
    return require("lmdb", "reading text-recognition LMDBs")


def is_text_lmdb(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def find_text_lmdbs(root: str) -> list[str]:
    """Every LMDB folder at or below `root` (benchmark roots hold one per dataset), sorted."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    found = [dirpath for dirpath, _, files in os.walk(root) if "data.mdb" in files]
    if not found:
        raise DataError(f"{root}: no LMDB below it (a text-recognition LMDB is a folder holding data.mdb)")
    return sorted(found)


_ENVIRONMENTS: dict[tuple[str, int], object] = {}


def _open_readonly(path: str):
    """One read-only environment per folder and process (lmdb refuses to open a folder twice in a process)."""
    key = (os.path.realpath(path), os.getpid())
    if key not in _ENVIRONMENTS:
        for inherited in [k for k in _ENVIRONMENTS if k[0] == key[0]]:   # a forked DataLoader worker: the parent's
            _ENVIRONMENTS.pop(inherited).close()                          # handle is not to be used here
        _ENVIRONMENTS[key] = _lmdb().open(path, readonly=True, lock=False, readahead=False, meminit=False,
                                          max_readers=128)
    return _ENVIRONMENTS[key]


class TextImageLMDB(torch.utils.data.Dataset):
    """One text-recognition LMDB as a map-style dataset.

    `labelled`: read `label-%09d` and serve `text` (the raw label, or its 36-character form when `normalise`);
    samples whose label is empty after normalisation or longer than `max_length` characters are left out, and
    `skipped` counts them (indices are re-mapped, `ccd_seed` stays the LMDB index). Unlabeled sets read no label.
    `size`: (height, width) every image is resized to (the recogniser's input; CCD: 32x128); `mean`/`std`: the
    normalisation of `pixel_values` (ImageNet's, as CCD's defaults).

    The environment is opened lazily in each process (DataLoader workers each open their own, read-only, lock-free).
    """

    def __init__(self, path: str, *, labelled: bool = True, size: tuple[int, int] = (32, 128),
                 normalise: bool = True, charset: str = CHARSET_36, max_length: int | None = 25,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if not is_text_lmdb(path):
            raise DataError(f"{path}: not an LMDB folder (no data.mdb in it)")
        self.path = path
        self.labelled = labelled
        self.size = (int(size[0]), int(size[1]))
        self.normalise = normalise
        self.charset = charset
        self.max_length = max_length
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._env = None
        self._pid = None
        with self._open().begin(write=False) as txn:
            count = txn.get(b"num-samples")
            if count is None:
                raise DataError(f"{path}: no 'num-samples' key; not a text-recognition LMDB "
                                "(keys num-samples, image-%09d, label-%09d)")
            self.num_samples = int(count.decode())
            self.indices, self.labels, self.skipped = self._read_labels(txn) if labelled else \
                (np.arange(1, self.num_samples + 1), None, 0)

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            self._env = _open_readonly(self.path)
            self._pid = os.getpid()
        return self._env

    def _read_labels(self, txn) -> tuple[np.ndarray, list[str], int]:
        indices, labels, skipped = [], [], 0
        for index in range(1, self.num_samples + 1):
            raw = txn.get(b"label-%09d" % index)
            if raw is None:
                raise DataError(f"{self.path}: sample {index} has no label-{index:09d}; open it with labelled=False "
                                "if the set is unlabeled")
            label = raw.decode("utf-8")
            shown = normalise_label(label, self.charset) if self.normalise else label
            if not shown or (self.max_length is not None and len(shown) > self.max_length):
                skipped += 1
                continue
            indices.append(index)
            labels.append(shown)
        return np.asarray(indices, dtype=np.int64), labels, skipped

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int):
        """The PIL image of item `i` (RGB, original size)."""
        from PIL import Image

        index = int(self.indices[i])
        with self._open().begin(write=False) as txn:
            raw = txn.get(b"image-%09d" % index)
        if raw is None:
            raise DataError(f"{self.path}: image-{index:09d} is missing")
        try:
            return Image.open(io.BytesIO(raw)).convert("RGB")
        except Exception as exc:  # PIL raises several kinds for undecodable bytes
            raise DataError(f"{self.path}: image-{index:09d} cannot be decoded ({type(exc).__name__}: {exc})") from None

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        image = self.image(i).resize((self.size[1], self.size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        item = {"pixel_values": (x - self.mean) / self.std, "ccd_seed": torch.tensor(int(self.indices[i]))}
        if self.labels is not None:
            item["text"] = self.labels[i]
        return item


def collate_text_images(items: list[dict]) -> dict:
    """Stack `pixel_values` and `ccd_seed`; `text` stays a list of strings."""
    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "ccd_seed": torch.stack([it["ccd_seed"] for it in items])}
    if "text" in items[0]:
        batch["text"] = [it["text"] for it in items]
    return batch


def write_text_lmdb(path: str, images: Iterable, labels: Iterable[str] | None = None, *,
                    image_format: str = "PNG", map_size: int = 1 << 30) -> int:
    """Write a text-recognition LMDB (keys `num-samples`, `image-%09d`, `label-%09d`) from PIL images, uint8
    `[H, W, 3]` arrays or already encoded bytes; returns the number of samples."""
    from PIL import Image

    lmdb = _lmdb()
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=map_size)
    labels = list(labels) if labels is not None else None
    count = 0
    with env.begin(write=True) as txn:
        for count, image in enumerate(images, 1):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, (bytes, bytearray)):
                buffer = io.BytesIO()
                image.save(buffer, format=image_format)
                image = buffer.getvalue()
            txn.put(b"image-%09d" % count, bytes(image))
            if labels is not None:
                txn.put(b"label-%09d" % count, labels[count - 1].encode("utf-8"))
        if labels is not None and len(labels) != count:
            raise DataError(f"write_text_lmdb: {count} images but {len(labels)} labels")
        txn.put(b"num-samples", str(count).encode())
    env.close()
    return count


def word_accuracy(predictions: Sequence[str], labels: Sequence[str], charset: str = CHARSET_36) -> float:
    """Fraction of exact matches under the 36-character protocol (both sides normalised)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return float("nan")
    hits = sum(normalise_label(p, charset) == normalise_label(t, charset) for p, t in zip(predictions, labels))
    return hits / len(labels)


__all__ = ["TextImageLMDB", "collate_text_images", "write_text_lmdb", "find_text_lmdbs", "is_text_lmdb",
           "normalise_label", "word_accuracy", "CHARSET_36"]
