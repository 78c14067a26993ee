"""Batches of conversations through the student's own processor and chat template.

Per batch:
1. each conversation is rendered with the chat template. The character spans of its assistant turns come from
   rendering growing prefixes (the prompt before turn k with the generation prompt, then the conversation through
   turn k), so any template whose prefixes render as prefixes works, without `{% generation %}` markers;
2. the processor encodes the batch in one call (image-token expansion, pixel inputs);
3. the rendered text is also tokenized alone, placeholders unexpanded, with character offsets. Its tokens are the
   processor's tokens outside the image expansions: aligning the two gives each processor token its turn (labels
   on assistant turns only) and each image its token extent;
4. truncation to `max_length` never cuts inside an image: a cut that would is moved to the image's first token and
   the images from there on are dropped (the batch is encoded again without them);
5. rows are padded on `padding_side`; `dataset` carries each sample's category (None where it has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlmdistill.errors import ConfigError, DataError

PADDING_SIDES = ("right", "left")


@dataclasses.dataclass
class _Row:
    text: str
    images: list[Any]
    #: character spans of the assistant turns in `text`
    spans: list[tuple[int, int]]
    origin: str


def _flat_text(messages: list[dict]) -> list[dict]:
    """Messages with string contents, for text-only chat templates (a plain tokenizer's)."""
    return [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
            for m in messages]


class ChatCollator:
    """Collate `ConversationDataset` items for a VLM (its `AutoProcessor`) or a text LM (its tokenizer).

    Returns `input_ids`, `attention_mask`, `labels` (the ids of assistant-turn tokens, -100 elsewhere), the
    processor's image inputs, any other per-token tensor it makes (e.g. `mm_token_type_ids`) and, with
    `with_categories`, `dataset` (the samples' categories; None where a sample has none).
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, padding_side: str = "right",
                 chat_template: str | None = None, with_categories: bool = False) -> None:
        if padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"{type(self.tokenizer).__name__} is not a fast tokenizer: label masking needs "
                              "character offsets (save the tokenizer with tokenizers' fast backend)")
        self.multimodal = getattr(processor, "image_processor", None) is not None
        self.template = (chat_template or getattr(processor, "chat_template", None)
                         or getattr(self.tokenizer, "chat_template", None))
        if not self.template:
            raise ConfigError(f"{type(processor).__name__} has no chat template: save one with the processor "
                              "(chat_template.jinja) or pass chat_template (a Jinja string or file)")
        self.max_length, self.padding_side, self.with_categories = max_length, padding_side, with_categories
        self.image_token = getattr(processor, "image_token", None) if self.multimodal else None
        if self.multimodal and not isinstance(self.image_token, str):
            raise ConfigError(f"{type(processor).__name__} names no `image_token`: the placeholder its chat template "
                              "writes for an image must be known to align the expanded image tokens")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        if self.tokenizer.pad_token is None:  # the processor pads the batch; LMs often ship without a pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        self._words: dict[int, bool] = {}
        self.pad_id = self.tokenizer.pad_token_id or 0

    def _is_word(self, token: int) -> bool:
        if token not in self._words:
            self._words[token] = token not in self._special and bool(self.tokenizer.decode([token]).strip())
        return self._words[token]

    # ------------------------------------------------------------------ rendering
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        render = self.processor.apply_chat_template if self.multimodal else self.tokenizer.apply_chat_template
        if not self.multimodal:
            messages = _flat_text(messages)
        return render(messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, item: dict[str, Any]) -> _Row:
        """The rendered conversation and the character spans of its assistant turns."""
        messages, origin = item["messages"], item.get("origin", "sample")
        if item["images"] and not self.multimodal:
            raise DataError(f"{origin}: the sample has images but {type(self.processor).__name__} has no image "
                            "processor (give the VLM's processor)")
        text = self._render(messages, False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = self._render(messages[:k], True), self._render(messages[: k + 1], False)
            if not (text.startswith(through) and through.startswith(prompt)):
                raise DataError(f"{origin}: the chat template does not render the conversation's prefixes as "
                                f"prefixes (turn {k}), so the assistant tokens cannot be located")
            spans.append((len(prompt), len(through)))
        if self.image_token is not None and text.count(self.image_token) != len(item["images"]):
            raise DataError(f"{origin}: the chat template wrote {text.count(self.image_token)} {self.image_token!r} "
                            f"placeholder(s) for {len(item['images'])} image(s)")
        return _Row(text=text, images=list(item["images"]), spans=spans, origin=origin)

    # ------------------------------------------------------------------- encoding
    def _encode(self, rows: list[_Row]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Processor outputs for the batch, and per row: its unpadded ids, labels mask and image groups."""
        kwargs: dict[str, Any] = dict(text=[r.text for r in rows], padding=True, return_tensors="pt",
                                      add_special_tokens=False)
        if any(r.images for r in rows):
            kwargs["images"] = [list(r.images) for r in rows]
        try:
            encoded = self.processor(**kwargs) if self.multimodal else self.tokenizer(**kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            origins = ", ".join(r.origin for r in rows)
            raise DataError(f"the processor failed on the batch of {origins}: {exc}") from None
        plain = self.tokenizer([r.text for r in rows], add_special_tokens=False, return_offsets_mapping=True)
        mask = encoded["attention_mask"].bool()
        per_row = []
        for i, row in enumerate(rows):
            full = encoded["input_ids"][i][mask[i]].tolist()
            supervised = [any(start < e and s < end for s, e in row.spans) for start, end in plain["offset_mapping"][i]]
            labels, groups = align(full, plain["input_ids"][i], supervised, self.image_token_id, row.origin,
                                   self._is_word)
            per_row.append({"ids": full, "supervised": labels, "groups": groups})
        return encoded, per_row

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self.render(item) for item in items]
        encoded, per_row = self._encode(rows)
        if self.max_length is not None:
            shortened = [self._shorten(row, info) for row, info in zip(rows, per_row)]
            if any(s is not None for s in shortened):
                rows = [s or r for s, r in zip(shortened, rows)]
                encoded, per_row = self._encode(rows)
        batch = self._pad(encoded, per_row)
        if self.with_categories:
            batch["dataset"] = [item.get("category") for item in items]
        return batch

    def _shorten(self, row: _Row, info: dict[str, Any]) -> _Row | None:
        """The row without the images a cut at `max_length` would reach, or None when no image is reached."""
        cut = self.max_length
        if len(info["ids"]) <= cut:
            return None
        for start, end, _, _ in info["groups"]:
            if start < cut < end:
                cut = start
        dropped = [first for start, _, first, _ in info["groups"] if start >= cut]
        if not dropped:
            return None
        first = dropped[0]
        char = -1
        for _ in range(first + 1):  # the placeholder of the first dropped image
            char = row.text.index(self.image_token, char + 1)
        spans = [(s, min(e, char)) for s, e in row.spans if s < char]
        return _Row(text=row.text[:char], images=row.images[:first], spans=spans, origin=row.origin)

    def _pad(self, encoded: dict[str, Any], per_row: list[dict[str, Any]]) -> dict[str, Any]:
        ids = encoded["input_ids"]
        per_token = [k for k, v in encoded.items()
                     if isinstance(v, torch.Tensor) and v.shape == ids.shape
                     and k not in ("input_ids", "attention_mask")]
        lengths = [min(len(r["ids"]), self.max_length or len(r["ids"])) for r in per_row]
        width = max(lengths)
        mask = encoded["attention_mask"].bool()
        out = {"input_ids": torch.full((len(per_row), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(len(per_row), width, dtype=torch.long),
               "labels": torch.full((len(per_row), width), -100, dtype=torch.long)}
        out.update({k: torch.zeros(len(per_row), width, dtype=encoded[k].dtype) for k in per_token})
        for i, (row, n) in enumerate(zip(per_row, lengths)):
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            row_ids = torch.tensor(row["ids"][:n])
            out["input_ids"][i, cols] = row_ids
            out["attention_mask"][i, cols] = 1
            out["labels"][i, cols] = torch.where(torch.tensor(row["supervised"][:n]), row_ids, -100)
            for k in per_token:
                out[k][i, cols] = encoded[k][i][mask[i]][:n]
        for key, value in encoded.items():
            if key not in out and key not in per_token:
                out[key] = value
        return out


def align(full: list[int], plain: list[int], supervised: list[bool], placeholder: int | None, origin: str,
          is_word=lambda token: True) -> tuple[list[bool], list[tuple[int, int, int, int]]]:
    """Map the plain tokenization (image placeholders as single tokens) onto the processor's (placeholders
    expanded). Returns the supervised flag of every processor token and the image groups as
    `(start, end, first image, number of images)` token extents.

    The processor changes nothing outside the placeholders, and a placeholder is a special token, so the text runs
    between placeholders tokenize alike in both. Runs that hold a word (`is_word`: not a special or whitespace
    token, which is all an image expansion is made of) or a supervised token anchor the alignment; placeholders with
    only markers or whitespace between them form one group, whose extent is then the span between two anchors.
    """
    marks = [i for i, t in enumerate(plain) if t == placeholder] if placeholder is not None else []
    if not marks:
        if full != plain:
            raise DataError(f"{origin}: the processor's tokens differ from the tokenizer's on a text-only sample")
        return list(supervised), []
    bounds = [-1, *marks, len(plain)]
    runs = [(bounds[k] + 1, bounds[k + 1]) for k in range(len(bounds) - 1)]  # text around the placeholders
    anchors = [k for k, (s, e) in enumerate(runs)
               if k in (0, len(runs) - 1) or any(supervised[s:e]) or any(is_word(t) for t in plain[s:e])]
    flags = [False] * len(full)
    groups = []

    def place(run: int, at: int) -> None:
        s, e = runs[run]
        if full[at:at + e - s] != plain[s:e]:
            raise DataError(f"{origin}: the processor's tokens do not match the chat template's text outside the "
                            "image placeholders; this processor rewrites text, which the conversations builder "
                            "cannot align")
        flags[at:at + e - s] = supervised[s:e]

    place(0, 0)
    pos = runs[0][1] - runs[0][0]
    for prev, nxt in zip(anchors, anchors[1:]):
        s, e = runs[nxt]
        if nxt == len(runs) - 1:
            at = len(full) - (e - s)
        else:
            at = next((o for o in range(pos + 1, len(full) - (e - s) + 1) if full[o:o + e - s] == plain[s:e]), -1)
        if at <= pos:
            raise DataError(f"{origin}: cannot locate the text after image {prev} among the processor's tokens")
        place(nxt, at)
        groups.append((pos, at, prev, nxt - prev))
        pos = at + e - s
    return flags, groups
