"""Local readers for the four data layouts an ELEVATER evaluation meets.

Every reader returns a `LabeledImages`: samples in the file's order (the order the toolkit's
prediction file needs), each with where it came from (`origin`, e.g. `test.txt:12`) so that a bad
line, a missing image or an out-of-range label is reported with its file and line.
Nothing here touches the network.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from vlmdistill.errors import DataError

from .tasks import read_classnames_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ZIP_SEPARATOR = "@"


@dataclass(frozen=True)
class Sample:
    source: str                 # a file path, "archive.zip@member", or "shard.tar#offset:size"
    labels: tuple[int, ...]
    origin: str                 # where this sample was declared, for error messages


@dataclass
class LabeledImages:
    """Samples of one split plus what the layout says about the classes."""

    samples: list[Sample]
    reader: str
    index_path: str
    classnames: list[str] | None = None
    multilabel: bool = False
    templates: list[str] | None = None    # a webdataset layout may ship its own templates
    _opener: "ImageOpener" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.multilabel = self.multilabel or any(len(s.labels) != 1 for s in self.samples)
        if self._opener is None:
            self._opener = ImageOpener()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[tuple[int, ...]]:
        return [s.labels for s in self.samples]

    def open_image(self, index: int) -> Image.Image:
        return self._opener.open(self.samples[index])

    def check_labels(self, num_classes: int) -> None:
        """Raise on the first label outside [0, num_classes), naming its file and line."""
        for sample in self.samples:
            for label in sample.labels:
                if not 0 <= label < num_classes:
                    raise DataError(f"{sample.origin}: label {label} is outside the {num_classes} classes "
                                    f"of this task (valid: 0..{num_classes - 1})")
            if not sample.labels and not self.multilabel:
                raise DataError(f"{sample.origin}: sample has no label")


class ImageOpener:
    """Opens plain files, `zip@member` paths and tar byte ranges; one zip handle per thread/process."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:  # DataLoader workers start with no open handles
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def _zip(self, path: str) -> zipfile.ZipFile:
        handles = getattr(self._local, "zips", None)
        if handles is None or getattr(self._local, "pid", None) != os.getpid():
            handles = self._local.zips = {}
            self._local.pid = os.getpid()
        if path not in handles:
            handles[path] = zipfile.ZipFile(path)
        return handles[path]

    def read_bytes(self, sample: Sample) -> bytes:
        source = sample.source
        try:
            if "#" in source and source.rsplit("#", 1)[0].endswith(".tar"):
                shard, span = source.rsplit("#", 1)
                offset, size = (int(x) for x in span.split(":"))
                with open(shard, "rb") as handle:
                    handle.seek(offset)
                    return handle.read(size)
            archive, member = split_zip_path(source)
            if archive is not None:
                return self._zip(archive).read(member)
            with open(source, "rb") as handle:
                return handle.read()
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{sample.origin}: cannot read image {source}: {exc}") from exc

    def open(self, sample: Sample) -> Image.Image:
        data = self.read_bytes(sample)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"{sample.origin}: image {sample.source} is not a readable image: {exc}") from exc
        return image.convert("RGB")


def split_zip_path(path: str) -> tuple[str | None, str]:
    """`dir/archive.zip@inner/img.jpg` -> (`dir/archive.zip`, `inner/img.jpg`); plain paths -> (None, path)."""
    marker = ".zip" + ZIP_SEPARATOR
    position = path.find(marker)
    if position < 0:
        return None, path
    return path[: position + 4], path[position + len(marker):]


class _SourceChecker:
    """Checks that every image exists before any model time is spent."""

    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}

    def check(self, source: str, origin: str) -> None:
        archive, member = split_zip_path(source)
        if archive is None:
            if not os.path.isfile(source):
                raise DataError(f"{origin}: image {source} does not exist")
            return
        if archive not in self._members:
            if not os.path.isfile(archive):
                raise DataError(f"{origin}: archive {archive} does not exist")
            try:
                with zipfile.ZipFile(archive) as handle:
                    self._members[archive] = set(handle.namelist())
            except zipfile.BadZipFile as exc:
                raise DataError(f"{origin}: {archive} is not a readable zip file: {exc}") from exc
        if member not in self._members[archive]:
            raise DataError(f"{origin}: {member} is not in {archive}")


def _resolve(base: str, relative: str) -> str:
    archive, member = split_zip_path(relative)
    if archive is None:
        return relative if os.path.isabs(relative) else os.path.join(base, relative)
    archive = archive if os.path.isabs(archive) else os.path.join(base, archive)
    return archive + ZIP_SEPARATOR + member


def _parse_labels(text: str, origin: str) -> tuple[int, ...]:
    try:
        labels = tuple(int(x) for x in text.split(",") if x.strip() != "")
    except ValueError:
        raise DataError(f"{origin}: labels {text!r} are not comma-separated integers") from None
    return labels


# ---------------------------------------------------------------- ELEVATER IRIS

def read_iris(index_path: str, root: str | None = None, labelmap: str | None = None,
              multilabel: bool = False, check_files: bool = True) -> LabeledImages:
    """IRIS index: `<image path> <comma-separated 0-based labels>` a line; paths relative to `root`
    (default: the index file's folder) and possibly `archive.zip@member`. `labelmap` (`labels.txt`)
    gives the class names, one a line."""
    if not os.path.isfile(index_path):
        raise DataError(f"index file {index_path} does not exist")
    root = root if root is not None else os.path.dirname(os.path.abspath(index_path))
    checker = _SourceChecker()
    samples = []
    with open(index_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            origin = f"{index_path}:{number}"
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{origin}: expected '<image path> <labels>', got {line!r}")
            path, labels = _resolve(root, parts[0]), _parse_labels(parts[1], origin)
            if check_files:
                checker.check(path, origin)
            samples.append(Sample(path, labels, origin))
    if labelmap is not None and not os.path.isabs(labelmap):
        labelmap = os.path.join(os.path.dirname(os.path.abspath(index_path)), labelmap)
    classnames = read_classnames_file(labelmap) if labelmap and os.path.isfile(labelmap) else None
    return LabeledImages(samples, "iris", index_path, classnames, multilabel)


# ---------------------------------------------------------------- ELEVATER COCO json

def read_coco(index_path: str, root: str | None = None, multilabel: bool = False,
              check_files: bool = True) -> LabeledImages:
    """COCO-style classification json: `images` (id, file_name, optional zip_file), `annotations`
    (image_id, category_id) and `categories` (id, name). Categories map to class indices in
    ascending id order; images keep the file's order; several annotations make a multi-label sample."""
    if not os.path.isfile(index_path):
        raise DataError(f"index file {index_path} does not exist")
    try:
        with open(index_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{index_path}: not a readable json file: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise DataError(f"{index_path}: missing list '{key}'")
    root = root if root is not None else os.path.dirname(os.path.abspath(index_path))
    categories = sorted(document["categories"], key=lambda c: c["id"])
    position = {c["id"]: i for i, c in enumerate(categories)}
    labels_of: dict = {image["id"]: [] for image in document["images"]}
    for number, annotation in enumerate(document["annotations"]):
        origin = f"{index_path}: annotations[{number}]"
        if annotation.get("image_id") not in labels_of:
            raise DataError(f"{origin}: image_id {annotation.get('image_id')!r} is not in 'images'")
        category = annotation.get("category_id")
        if category not in position:
            raise DataError(f"{origin}: category_id {category!r} is outside the class list "
                            f"(categories have ids {sorted(position)[:10]}...)")
        labels_of[annotation["image_id"]].append(position[category])
    checker = _SourceChecker()
    samples = []
    for number, image in enumerate(document["images"]):
        origin = f"{index_path}: images[{number}] (id {image.get('id')})"
        name = image.get("file_name")
        if not name:
            raise DataError(f"{origin}: missing 'file_name'")
        relative = f"{image['zip_file']}{ZIP_SEPARATOR}{name}" if image.get("zip_file") else name
        path = _resolve(root, relative)
        if check_files:
            checker.check(path, origin)
        samples.append(Sample(path, tuple(sorted(set(labels_of[image["id"]]))), origin))
    return LabeledImages(samples, "coco", index_path, [c.get("name", str(c["id"])) for c in categories], multilabel)


# ---------------------------------------------------------------- image folders

def read_image_folder(root: str, classnames_file: str | None = None) -> LabeledImages:
    """One sub-folder per class. Folder names that are all integers are class indices (the Chinese
    ELEVATER release: `000`, `001`, ...), other names sort alphabetically (torchvision's rule).
    `classnames_file` (e.g. `label_cn.txt`) names the classes by index."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders")
    numeric = all(re.fullmatch(r"\d+", d) for d in folders)
    index_of = {d: int(d) for d in folders} if numeric else {d: i for i, d in enumerate(folders)}
    samples = []
    for folder in folders:
        directory = os.path.join(root, folder)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS):
                samples.append(Sample(path, (index_of[folder],), path))
    classnames = read_classnames_file(classnames_file) if classnames_file else (None if numeric else folders)
    return LabeledImages(samples, "image_folder", root, classnames)


# ---------------------------------------------------------------- webdataset shards

_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key ends at the first dot


def read_webdataset(root: str, split: str = "test") -> LabeledImages:
    """CLIP_benchmark layout: `root/classnames.txt`, optional `root/zeroshot_classification_templates.txt`,
    shards `root/<split>/*.tar` holding `<key>.{jpg,png,webp}` + `<key>.cls`. The shards are indexed
    once (member byte ranges), so images are read on demand like any other file."""
    shard_dir = os.path.join(root, split)
    if not os.path.isdir(shard_dir):
        raise DataError(f"webdataset split folder {shard_dir} does not exist")
    shards = sorted((f for f in os.listdir(shard_dir) if f.endswith(".tar")), key=_natural_key)
    if not shards:
        raise DataError(f"{shard_dir} holds no .tar shards")
    samples = []
    for shard in shards:
        samples.extend(_index_shard(os.path.join(shard_dir, shard)))
    classnames_path = os.path.join(root, "classnames.txt")
    templates_path = os.path.join(root, "zeroshot_classification_templates.txt")
    classnames = read_classnames_file(classnames_path) if os.path.isfile(classnames_path) else None
    templates = read_classnames_file(templates_path) if os.path.isfile(templates_path) else None
    return LabeledImages(samples, "webdataset", shard_dir, classnames, templates=templates)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _index_shard(path: str) -> list[Sample]:
    groups: dict[str, dict[str, tuple[int, int, str]]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                match = _KEY_AND_EXT.match(member.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size, member.name)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: not a readable tar shard: {exc}") from exc
    samples = []
    with open(path, "rb") as handle:
        for key in order:
            fields = groups[key]
            origin = f"{path}: sample {key!r}"
            image_ext = next((e for e in ("webp", "png", "jpg", "jpeg") if e in fields), None)
            if image_ext is None or "cls" not in fields:
                raise DataError(f"{origin}: needs an image (.jpg/.png/.webp) and a .cls member, has {sorted(fields)}")
            offset, size, _ = fields["cls"]
            handle.seek(offset)
            text = handle.read(size).decode("utf-8").strip()
            offset, size, _ = fields[image_ext]
            samples.append(Sample(f"{path}#{offset}:{size}", _parse_labels(text, origin), origin))
    return samples


# ---------------------------------------------------------------- images already in memory

class _MemoryOpener:
    """Serves PIL images held in a list; `Sample.source` is `memory:<index>`."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = list(images)

    def open(self, sample: Sample) -> Image.Image:
        return self.images[int(sample.source.split(":", 1)[1])].convert("RGB")


def from_images(images: Sequence[Image.Image], labels: Sequence[int | Sequence[int]],
                classnames: Sequence[str] | None = None, multilabel: bool = False,
                name: str = "memory") -> LabeledImages:
    """A dataset of in-memory PIL images (e.g. a plugin demo's held-out split); labels are class
    indices, or tuples of them for multi-label data."""
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    samples = [Sample(f"memory:{i}", tuple(int(x) for x in (lab if isinstance(lab, (tuple, list)) else (lab,))),
                      f"{name}[{i}]") for i, lab in enumerate(labels)]
    return LabeledImages(samples, "memory", name, list(classnames) if classnames else None, multilabel,
                         _opener=_MemoryOpener(images))


# ---------------------------------------------------------------- layout detection

FORMATS = ("iris", "coco", "image_folder", "webdataset")


def read_dataset(path: str, fmt: str = "auto", *, split: str = "test", index_file: str | None = None,
                 classnames_file: str | None = None, labelmap: str | None = None,
                 multilabel: bool = False) -> LabeledImages:
    """Read `path` (a dataset folder, or an index file) in format `fmt` (`auto` guesses from the layout)."""
    if fmt == "auto":
        fmt = detect_format(path, split=split, index_file=index_file)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; valid: {list(FORMATS)} or 'auto'")
    if fmt in ("iris", "coco"):
        index = path if os.path.isfile(path) else os.path.join(path, index_file or _default_index(path, fmt, split))
        if fmt == "iris":
            return read_iris(index, labelmap=labelmap or "labels.txt", multilabel=multilabel)
        return read_coco(index, multilabel=multilabel)
    if fmt == "image_folder":
        folder = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
        return read_image_folder(folder, classnames_file)
    return read_webdataset(path, split)


def _default_index(path: str, fmt: str, split: str) -> str:
    candidates = [f"{split}.txt", f"{split}_ic.txt", f"{split}_images.txt"] if fmt == "iris" else \
        [f"{split}.json", f"{split}_meta.json"]
    for name in candidates:
        if os.path.isfile(os.path.join(path, name)):
            return name
    raise DataError(f"{path}: no {fmt} index file for split {split!r} (looked for {candidates})")


def detect_format(path: str, split: str = "test", index_file: str | None = None) -> str:
    if os.path.isfile(path):
        return "coco" if path.endswith(".json") else "iris"
    if not os.path.isdir(path):
        raise DataError(f"dataset path {path} does not exist")
    if index_file:
        return "coco" if index_file.endswith(".json") else "iris"
    split_dir = os.path.join(path, split)
    if os.path.isdir(split_dir) and any(f.endswith(".tar") for f in os.listdir(split_dir)):
        return "webdataset"
    for fmt in ("iris", "coco"):
        try:
            _default_index(path, fmt, split)
            return fmt
        except DataError:
            pass
    if os.path.isdir(split_dir):
        return "image_folder"
    raise DataError(f"{path}: cannot tell the data format (no {split}.txt/{split}.json index, no "
                    f"{split}/ shards or class folders); pass the format explicitly")


def subset(data: LabeledImages, indices: Sequence[int]) -> LabeledImages:
    """The same dataset restricted to `indices` (kept in that order)."""
    return LabeledImages([data.samples[i] for i in indices], data.reader, data.index_path, data.classnames,
                         data.multilabel, data.templates, data._opener)
