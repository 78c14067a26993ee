"""One accumulation window: the micro-batches of one optimizer step and their teacher keys.

The teacher keys of the whole window are computed before the first student forward (no grad, one chunk on the
teacher's device at a time), gathered across processes, and every micro-batch then finds its rows — its
positives — at a fixed offset inside them. The window keeps the keys and, per micro-batch, only a small
signature (shapes and a few sampled values, `BatchSignature`), never the inputs: the device holds one
micro-batch at a time plus the keys. Forward calls are matched to the announced micro-batches by signature, so a
micro-batch that was never announced is refused instead of being paired with the wrong keys, at a cost that does
not grow with the batch.
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


#: values sampled per tensor for a signature (evenly spaced over the flattened tensor, first and last included)
SIGNATURE_SAMPLES = 16


class BatchSignature:
    """What identifies a micro-batch cheaply: each tensor input's name, shape, dtype and the bits of
    `SIGNATURE_SAMPLES` elements at fixed positions (one small read per tensor, whatever the batch size; bits, so
    that a NaN input still matches itself and reaches the loss's non-finite check)."""

    _BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def __init__(self, batch: Mapping[str, Any]) -> None:
        entries = []
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                entries.append((key, tuple(value.shape), value.dtype, self._sample(value.detach())))
        self.entries = tuple(entries)

    @classmethod
    def _sample(cls, value: torch.Tensor) -> tuple:
        n = value.numel()
        if n == 0:
            return ()
        k = min(SIGNATURE_SAMPLES, n)
        # Integer positions computed on the host, so that a batch and its copy on another device agree.
        flat = torch.arange(k, dtype=torch.long) * (n - 1) // max(k - 1, 1)
        index = torch.unravel_index(flat, value.shape) if value.dim() else ()
        picked = value[tuple(i.to(value.device) for i in index)] if value.dim() else value.reshape(1)
        bits = cls._BITS.get(picked.element_size())
        if bits is not None and not picked.is_complex():
            picked = picked.contiguous().view(bits)
        return tuple(picked.cpu().tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSignature) and bool(self.entries) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)


class AccumulationWindow:
    """Micro-batches of one optimizer step with the gathered teacher keys of all of them."""

    def __init__(self, signatures: list[BatchSignature], sizes: list[int], image_keys: torch.Tensor,
                 text_keys: torch.Tensor, rank_offset: int, world_size: int, implicit: bool = False) -> None:
        self.signatures = list(signatures)
        self.sizes = list(sizes)
        self.offsets = [rank_offset + sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.image_keys = image_keys     # [B, D], B = rows of the window over all processes
        self.text_keys = text_keys
        self.world_size = world_size
        self.implicit = implicit         # built from a lone forward (no window announced)
        self.claimed: list[bool] = [False] * len(self.signatures)

    @classmethod
    def build(cls, batches: list[Mapping[str, Any]], encode: Callable[[Mapping[str, Any]], tuple],
              chunk_size: int | None, *, gather: bool = True, implicit: bool = False) -> "AccumulationWindow":
        """Teacher keys of every micro-batch, `chunk_size` rows at a time, gathered across processes. `encode` moves
        each chunk to the teacher's device; nothing of `batches` is kept."""
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
        return cls([BatchSignature(b) for b in batches], [batch_size_of(b) for b in batches], image_keys, text_keys,
                   rank_offset, world_size, implicit)

    @property
    def total(self) -> int:
        return self.image_keys.shape[0]

    @property
    def micro_batches(self) -> int:
        return len(self.signatures)

    @property
    def exhausted(self) -> bool:
        return all(self.claimed)

    @property
    def started(self) -> bool:
        return any(self.claimed)

    def claim(self, inputs: Mapping[str, Any]) -> int:
        """Index of the announced micro-batch these inputs are: the first unclaimed one with their signature (in the
        usual order of forwards, the next one)."""
        signature = BatchSignature(inputs)
        for index, announced in enumerate(self.signatures):
            if not self.claimed[index] and announced == signature:
                self.claimed[index] = True
                return index
        raise ValueError(
            f"msd: this micro-batch is not one of the {self.micro_batches} micro-batches announced for the current "
            "optimizer step (on_accumulation_window). Announce exactly the batches you forward, in any order")
