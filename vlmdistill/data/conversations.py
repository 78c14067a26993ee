"""Chat data from local files: LLaVA JSON/JSONL, chat-message records, and `datasets` folders or files.

Every record becomes one `Conversation`: messages in the standard content-part form that processors' chat
templates read (`{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}`), the images
of its image parts in order, and an optional category (the `dataset` name lingudistill selects by). Accepted
records:

* LLaVA: `{"image": "a.jpg" | "images": [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}` (`<image>` marks where each image goes; without markers the images open the
  first user turn, as LLaVA's own preprocessing puts them);
* chat messages: `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
  ...], "images": [...]}` (content may also be a plain string);
* either form without images (text-only samples mix freely with image samples).

Sources: a `.json` file (a list of records), a `.jsonl` file, a `.parquet` file, a folder written by
`datasets.Dataset.save_to_disk` (or a `DatasetDict`, of which `split` is read), or a folder of such files.
Images are paths (relative ones resolved against `image_root`, else the data file's folder), PIL images, or
`datasets` image dicts (`{"bytes": ..., "path": ...}`). Errors name the file and the record index.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Iterator

import torch

from vlmdistill.errors import DataError

IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclasses.dataclass
class Conversation:
    messages: list[dict[str, Any]]
    #: one entry per image part, in order: a resolved path, a PIL image, or a `datasets` image dict
    images: list[Any]
    category: str | None
    #: "FILE, record N": where the record came from, for error messages
    origin: str


# ----------------------------------------------------------------------------------------------- sources
def _read_json(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a chat data JSON file holds a list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: str) -> list:
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, record {len(records)} (line {line_no}): not valid JSON ({exc})") \
                        from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    return records


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet files and `datasets` folders needs the `datasets` package") from None
    return datasets


def _undecoded(data):
    """Image columns as `{"bytes", "path"}` dicts: parsing every record must not decode every image."""
    datasets = _datasets()
    for name, feature in data.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.Image):
            data = data.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (list, datasets.Sequence, datasets.List)) and isinstance(inner, datasets.Image):
            data = data.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return data


def _read_parquet(path: str):
    datasets = _datasets()
    try:
        return _undecoded(datasets.load_dataset("parquet", data_files=path, split="train"))
    except Exception as exc:  # pyarrow and datasets raise many types for a damaged file
        raise DataError(f"{path}: cannot read it as parquet ({type(exc).__name__}: {exc})") from None


def is_saved_dataset(folder: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def _read_saved(folder: str, split: str):
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(folder)
    except Exception as exc:
        raise DataError(f"{folder}: cannot load it with datasets.load_from_disk ({type(exc).__name__}: {exc})") \
            from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{folder}: the saved DatasetDict has no split {split!r}; splits: {sorted(data)}")
        data = data[split]
    return _undecoded(data)


def data_files(path: str) -> list[str]:
    """The data files a `path` names: itself, or the `.json` / `.jsonl` / `.parquet` files of a folder."""
    if os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise DataError(f"{path}: unknown chat data format; use {', '.join(DATA_SUFFIXES)} or a folder saved "
                            "with datasets' save_to_disk")
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"chat data {path} does not exist")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(DATA_SUFFIXES))
    if not files:
        raise DataError(f"{path}: a folder of chat data needs .json, .jsonl or .parquet files or a dataset saved "
                        "with save_to_disk; found none")
    return files


def open_sources(path: str, split: str = "train") -> list[tuple[str, Any]]:
    """`[(file, records)]`; records are a list or a `datasets.Dataset` (indexed lazily)."""
    if os.path.isdir(path) and is_saved_dataset(path):
        return [(path, _read_saved(path, split))]
    readers = {".jsonl": _read_jsonl, ".parquet": _read_parquet, ".json": _read_json}
    return [(file, readers[os.path.splitext(file)[1]](file)) for file in data_files(path)]


# ------------------------------------------------------------------------------------------ one record
def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _split_markers(value: str) -> list[dict[str, str]]:
    """LLaVA text with `<image>` markers as content parts; whitespace beside a marker is the template's business."""
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(value.split(IMAGE_MARKER)):
        if i:
            parts.append({"type": "image"})
        piece = piece.strip() if IMAGE_MARKER in value else piece
        if piece:
            parts.append(_text_part(piece))
    return parts


def _image_list(record: dict, where: str) -> list[Any]:
    if "images" in record and record["images"] is not None:
        images = record["images"]
        if not isinstance(images, (list, tuple)):
            images = [images]
    elif record.get("image") is not None:
        images = [record["image"]]
    else:
        images = []
    for image in images:
        if image is None:
            raise DataError(f"{where}: an entry of `images` is empty")
    return list(images)


def _llava_messages(turns: Any, images: list, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `conversations` must be a non-empty list of {{from, value}} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs `from` and `value`")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}: conversations[{i}] has from={turn['from']!r}; valid: {', '.join(ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: conversations[{i}].value must be a string")
        messages.append({"role": role, "content": _split_markers(turn["value"])})
    markers = sum(p["type"] == "image" for m in messages for p in m["content"])
    if markers == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: the record has images but no user turn to put them in")
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    return messages


def _chat_messages(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] needs `role` and `content`")
        role = ROLES.get(str(message["role"]).lower())
        if role is None:
            raise DataError(f"{where}: messages[{i}] has role={message['role']!r}; valid: system, user, assistant")
        content = message["content"]
        if isinstance(content, str):
            parts = [_text_part(content)]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(_text_part(part["text"]))
                elif kind == "image":
                    parts.append({"type": "image"})
                else:
                    raise DataError(f"{where}: messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}} "
                                    f"or {{'type': 'image'}}, got {part!r}"[:400])
        else:
            raise DataError(f"{where}: messages[{i}].content must be a string or a list of parts")
        messages.append({"role": role, "content": parts})
    return messages


def parse_record(record: Any, *, where: str, image_root: str | None, base_dir: str,
                 category_column: str | None) -> Conversation:
    """One raw record as a `Conversation`; image paths resolved and checked to exist."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a mapping, got {type(record).__name__}")
    images = _image_list(record, where)
    if "conversations" in record:
        messages = _llava_messages(record["conversations"], images, where)
    elif "messages" in record:
        messages = _chat_messages(record["messages"], where)
    else:
        raise DataError(f"{where}: a record needs `conversations` (LLaVA) or `messages` (chat format); keys: "
                        f"{sorted(record)}")
    parts = sum(p["type"] == "image" for m in messages for p in m["content"])
    if parts != len(images):
        raise DataError(f"{where}: {parts} image placeholder(s) in the text but {len(images)} image(s) given")
    if any(p["type"] == "image" for m in messages if m["role"] == "assistant" for p in m["content"]):
        raise DataError(f"{where}: an assistant turn holds an image; images belong to user turns")
    category = None
    if category_column is not None:
        value = record.get(category_column)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: category column {category_column!r} must hold a string, got {value!r}")
        category = value or None
    return Conversation(messages=messages, images=[_resolve(im, image_root, base_dir, where) for im in images],
                        category=category, origin=where)


def _resolve(image: Any, image_root: str | None, base_dir: str, where: str) -> Any:
    if isinstance(image, dict):  # a `datasets` Image column read without decoding
        if image.get("bytes"):
            return image
        image = image.get("path")
    if isinstance(image, str):
        path = image if os.path.isabs(image) else os.path.join(image_root or base_dir, image)
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {path} does not exist"
                            + ("" if image_root else " (relative paths are read from image_root, else the data "
                                                     "file's folder)"))
        return path
    if hasattr(image, "convert"):  # a PIL image
        return image
    raise DataError(f"{where}: an image must be a path, a PIL image or a datasets image, got {type(image).__name__}")


def load_image(image: Any, where: str):
    """An RGB PIL image; an unreadable file raises naming the file and the record."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, dict):
            loaded = Image.open(io.BytesIO(image["bytes"]))
        elif isinstance(image, str):
            loaded = Image.open(image)
        else:
            loaded = image
        return loaded.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        name = image if isinstance(image, str) else (image.get("path") or "embedded bytes"
                                                      if isinstance(image, dict) else "image")
        raise DataError(f"{where}: cannot read image {name} ({exc})") from None


# ---------------------------------------------------------------------------------------------- dataset
class ConversationDataset(torch.utils.data.Dataset):
    """Conversations from `path` (see the module docstring). Every record is parsed and its image paths checked
    when the dataset is built, so a bad record fails before training; images are opened in `__getitem__`.

    Items: `{"messages": [...], "images": [PIL images], "category": str | None, "origin": "FILE, record N"}`.
    """

    def __init__(self, path: str, *, image_root: str | None = None, category_column: str | None = None,
                 split: str = "train", max_samples: int | None = None) -> None:
        if image_root is not None and not os.path.isdir(image_root):
            raise DataError(f"image_root {image_root} is not a folder")
        self.path, self.image_root, self.category_column = path, image_root, category_column
        self.items: list[Conversation] = []
        for file, records in open_sources(path, split):
            base = file if os.path.isdir(file) else os.path.dirname(os.path.abspath(file))
            for index in range(len(records)):
                if max_samples is not None and len(self.items) >= max_samples:
                    break
                self.items.append(parse_record(records[index], where=f"{file}, record {index}",
                                               image_root=image_root, base_dir=base,
                                               category_column=category_column))
        if not self.items:
            raise DataError(f"{path}: no records")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {"messages": item.messages, "images": [load_image(im, item.origin) for im in item.images],
                "category": item.category, "origin": item.origin}

    def categories(self) -> dict[str | None, int]:
        """How many samples each category (None: none given) holds."""
        counts: dict[str | None, int] = {}
        for item in self.items:
            counts[item.category] = counts.get(item.category, 0) + 1
        return counts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))
