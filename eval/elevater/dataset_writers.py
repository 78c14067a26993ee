"""Write labelled images in each layout the readers accept (IRIS, COCO json, image folder,
webdataset). Used to build the demo datasets and the reader tests from one set of images; PNG keeps
pixels identical across layouts."""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Sequence

from PIL import Image

from vlmdistill.extras import require

Labels = Sequence[Sequence[int]]   # one tuple of class indices per image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def write_iris(out_dir: str, images: Sequence[Image.Image], labels: Labels, classnames: Sequence[str], *,
               split: str = "test", zipped: bool = True) -> str:
    """`<split>.txt` lines `<path> <labels>`, images in `<split>.zip` (as `zip@member`) or loose files;
    `labels.txt` holds the class names. Returns the index path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    if zipped:
        with zipfile.ZipFile(os.path.join(out_dir, f"{split}.zip"), "w", zipfile.ZIP_STORED) as archive:
            for i, (image, positives) in enumerate(zip(images, labels)):
                member = f"{split}/{i:05d}.png"
                archive.writestr(member, _png(image))
                lines.append(f"{split}.zip@{member} {','.join(str(p) for p in positives)}")
    else:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for i, (image, positives) in enumerate(zip(images, labels)):
            image.save(os.path.join(out_dir, split, f"{i:05d}.png"))
            lines.append(f"{split}/{i:05d}.png {','.join(str(p) for p in positives)}")
    _write_lines(os.path.join(out_dir, f"{split}.txt"), lines)
    _write_lines(os.path.join(out_dir, "labels.txt"), list(classnames))
    return os.path.join(out_dir, f"{split}.txt")


def write_coco(out_dir: str, images: Sequence[Image.Image], labels: Labels, classnames: Sequence[str], *,
               split: str = "test", zip_name: str | None = "images.zip") -> str:
    """`<split>.json` with images (id, file_name, zip_file), one annotation per label, categories with
    ids from 1. Returns the index path."""
    os.makedirs(out_dir, exist_ok=True)
    entries, annotations = [], []
    archive = zipfile.ZipFile(os.path.join(out_dir, zip_name), "a" if os.path.exists(
        os.path.join(out_dir, zip_name)) else "w", zipfile.ZIP_STORED) if zip_name else None
    try:
        for i, (image, positives) in enumerate(zip(images, labels)):
            name = f"{split}/{i:05d}.png"
            entry = {"id": i + 1, "file_name": name, "width": image.width, "height": image.height}
            if archive is not None:
                archive.writestr(name, _png(image))
                entry["zip_file"] = zip_name
            else:
                os.makedirs(os.path.join(out_dir, split), exist_ok=True)
                image.save(os.path.join(out_dir, name))
            entries.append(entry)
            for positive in positives:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(positive) + 1})
    finally:
        if archive is not None:
            archive.close()
    document = {"images": entries, "annotations": annotations,
                "categories": [{"id": c + 1, "name": name} for c, name in enumerate(classnames)]}
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, ensure_ascii=False)
    return path


def write_image_folder(out_dir: str, images: Sequence[Image.Image], labels: Labels, classnames: Sequence[str], *,
                       split: str = "test", classnames_file: str = "label.txt") -> str:
    """`<split>/<id>/<n>.png` with zero-padded numeric class folders (the Chinese ELEVATER release's
    layout) and the class names in `classnames_file`. Single-label only. Returns the split folder."""
    width = 1 if len(classnames) <= 10 else 3
    for i, (image, positives) in enumerate(zip(images, labels)):
        if len(positives) != 1:
            raise ValueError("an image folder holds single-label data only")
        folder = os.path.join(out_dir, split, f"{positives[0]:0{width}d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:05d}.png"))
    _write_lines(os.path.join(out_dir, classnames_file), list(classnames))
    return os.path.join(out_dir, split)


def write_webdataset(out_dir: str, images: Sequence[Image.Image], labels: Labels, classnames: Sequence[str], *,
                     templates: Sequence[str] | None = None, split: str = "test", max_count: int = 10_000) -> str:
    """CLIP_benchmark layout written with webdataset's ShardWriter: `<split>/<n>.tar` of
    `<key>.png` + `<key>.cls`, `classnames.txt`, optional `zeroshot_classification_templates.txt`."""
    webdataset = require("webdataset", "writing ELEVATER webdataset shards")

    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    with webdataset.ShardWriter(os.path.join(out_dir, split, "%d.tar"), maxcount=max_count, verbose=0) as sink:
        for i, (image, positives) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"s{i:07d}", "png": _png(image),
                        "cls": ",".join(str(p) for p in positives).encode()})
        shards = sink.shard
    _write_lines(os.path.join(out_dir, split, "nshards.txt"), [str(shards)])
    _write_lines(os.path.join(out_dir, "classnames.txt"), list(classnames))
    if templates:
        _write_lines(os.path.join(out_dir, "zeroshot_classification_templates.txt"), list(templates))
    return os.path.join(out_dir, split)
