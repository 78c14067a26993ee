"""One accumulation window: the micro-batches of one optimizer step and their teacher keys.

The teacher keys of the whole window are computed before the first student forward (no grad,
chunked), gathered across processes, and every micro-batch then finds its rows — its positives —
at a fixed offset inside them. Forward calls are matched to the announced micro-batches, so a
micro-batch that was never announced is refused instead of being paired with the wrong keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from vlmdistill.distributed import gather_rows, world


def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


def split_batch(batch: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """Row chunks of `size` (the last may be shorter); values without a batch dimension are shared."""
    total = batch_size_of(batch)
    chunks = []
    for start in range(0, total, size):
        stop = min(start + size, total)
        chunk = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
                chunk[key] = value[start:stop]
            elif isinstance(value, (list, tuple)) and len(value) == total:
                chunk[key] = value[start:stop]
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


def same_batch(inputs: Mapping[str, Any], announced: Mapping[str, Any]) -> bool:
    """Do a forward's tensor inputs equal those of an announced micro-batch?"""
    compared = 0
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        other = announced.get(key)
        if not isinstance(other, torch.Tensor) or other.shape != value.shape:
            return False
        if other is not value and not torch.equal(other.to(value.device), value):
            return False
        compared += 1
    return compared > 0


class AccumulationWindow:
    """Micro-batches of one optimizer step with the gathered teacher keys of all of them."""

    def __init__(self, batches: list[Mapping[str, Any]], image_keys: torch.Tensor, text_keys: torch.Tensor,
                 rank_offset: int, world_size: int, implicit: bool = False) -> None:
        self.batches = list(batches)
        self.sizes = [batch_size_of(b) for b in self.batches]
        starts = [rank_offset + sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.offsets = starts
        self.image_keys = image_keys     # [B, D], B = rows of the window over all processes
        self.text_keys = text_keys
        self.world_size = world_size
        self.implicit = implicit         # built from a lone forward (no window announced)
        self.claimed: list[bool] = [False] * len(self.batches)

    @classmethod
    def build(cls, batches: list[Mapping[str, Any]], encode: Callable[[Mapping[str, Any]], tuple],
              chunk_size: int | None, *, gather: bool = True, implicit: bool = False) -> "AccumulationWindow":
        """Teacher keys of every micro-batch, `chunk_size` rows at a time, gathered across processes."""
        images, texts = [], []
        for batch in batches:
            pieces = split_batch(batch, chunk_size) if chunk_size else [batch]
            for piece in pieces:
                image, text = encode(piece)
                images.append(image)
                texts.append(text)
        image_keys, text_keys = torch.cat(images), torch.cat(texts)
        rank_offset, world_size = 0, 1
        if gather:
            image_keys, rank_offset = gather_rows(image_keys)
            text_keys, _ = gather_rows(text_keys)
            world_size = world()[1]
        return cls(batches, image_keys, text_keys, rank_offset, world_size, implicit)

    @property
    def total(self) -> int:
        return self.image_keys.shape[0]

    @property
    def micro_batches(self) -> int:
        return len(self.batches)

    @property
    def exhausted(self) -> bool:
        return all(self.claimed)

    @property
    def started(self) -> bool:
        return any(self.claimed)

    def claim(self, inputs: Mapping[str, Any]) -> int:
        """Index of the announced micro-batch these inputs are (the next unclaimed one that matches)."""
        for index, batch in enumerate(self.batches):
            if not self.claimed[index] and same_batch(inputs, batch):
                self.claimed[index] = True
                return index
        raise ValueError(
            f"msd: this micro-batch is not one of the {self.micro_batches} micro-batches announced for the current "
            "optimizer step (on_accumulation_window). Announce exactly the batches you forward, in any order")
