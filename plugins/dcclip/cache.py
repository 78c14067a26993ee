"""Teacher-feature cache: teacher features computed once, stored as safetensors shards, looked up by
(sample key, augmentation seed) during stage 1 so that no teacher forward runs.

Layout of a cache directory:

    manifest.json                 format, teacher fingerprint, tap description, data fingerprint,
                                  feature shapes, dtype, shard list
    features-00000.safetensors    per shard: image_map [n, C, h, w], image_embeds / text_embeds [n, E],
                                  ragged text rows (text_tokens [T, D], text_mask [T], text_ids [T],
                                  text_offsets [n+1]), pixel_stats [n, 3] (float64), seeds [n];
                                  the sample keys in the file's metadata

A cache is refused when the teacher's weights or taps differ from those it was built with, when the
data pipeline's fingerprint differs, and (per batch) when the token ids or pixel statistics of a
sample differ from the ones the teacher saw: a changed tokenizer, resize, normalisation or
augmentation shows up there even if nobody updated a fingerprint.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlmdistill.errors import DataError

from .features import TowerFeatures

CACHE_FORMAT = "vlmdistill.dcclip.teacher_cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
REBUILD_HINT = "rebuild it with `vlmdistill cache-teacher <recipe>`"


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's class and every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixel_statistics(pixels: torch.Tensor) -> torch.Tensor:
    """`[B, 3]` float64 per-sample (mean, mean square, position-weighted mean) of a pixel batch: cheap,
    and different for a different resize, normalisation, crop or flip."""
    flat = pixels.detach().reshape(pixels.shape[0], -1).to(torch.float64)
    weights = torch.linspace(-1.0, 1.0, flat.shape[1], dtype=torch.float64, device=flat.device)
    return torch.stack([flat.mean(1), flat.pow(2).mean(1), (flat * weights).mean(1)], dim=1).cpu()


def _valid_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last valid position."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * positions).amax(dim=1)


class TeacherCacheWriter:
    """Accumulates teacher features batch by batch and writes shards of `samples_per_shard` samples."""

    def __init__(self, directory: str, *, samples_per_shard: int = 1024, dtype: torch.dtype = torch.float32,
                 metadata: dict[str, Any] | None = None) -> None:
        if os.path.isdir(directory) and os.listdir(directory):
            raise DataError(f"teacher cache directory {directory} is not empty; remove it or pick another")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.samples_per_shard = int(samples_per_shard)
        self.dtype = dtype
        self.metadata = dict(metadata or {})
        self._rows: list[dict[str, Any]] = []
        self._shards: list[dict[str, Any]] = []
        self._shapes: dict[str, list[int]] = {}
        self._seen: set[tuple[str, int]] = set()

    def add(self, keys: list[str], seeds: torch.Tensor, features: TowerFeatures, *, ids: torch.Tensor | None,
            pixels: torch.Tensor | None) -> None:
        seeds = torch.as_tensor(seeds).reshape(-1).tolist()
        if len(keys) != len(seeds):
            raise DataError(f"teacher cache: {len(keys)} sample keys but {len(seeds)} augmentation seeds")
        stats = pixel_statistics(pixels) if pixels is not None else None
        lengths = _valid_lengths(features.text_mask).tolist() if features.text_mask is not None else None
        for i, (key, seed) in enumerate(zip(keys, seeds)):
            if (key, int(seed)) in self._seen:
                raise DataError(f"teacher cache: sample {key!r} with augmentation seed {seed} was given twice")
            self._seen.add((key, int(seed)))
            row: dict[str, Any] = {"key": key, "seed": int(seed)}
            for name in ("image_map", "image_embeds", "text_embeds"):
                value = getattr(features, name)
                if value is not None:
                    row[name] = value[i].detach().to("cpu", self.dtype)
                    self._shapes[name] = list(value.shape[1:])
            if features.text_tokens is not None and lengths is not None:
                n = int(lengths[i])
                row["text_tokens"] = features.text_tokens[i, :n].detach().to("cpu", self.dtype)
                row["text_mask"] = features.text_mask[i, :n].detach().to("cpu", torch.bool)
                row["text_ids"] = ids[i, :n].detach().to("cpu", torch.long) if ids is not None else None
                self._shapes["text_tokens"] = [int(features.text_tokens.shape[-1])]
            if stats is not None:
                row["pixel_stats"] = stats[i]
            self._rows.append(row)
            if len(self._rows) >= self.samples_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        tensors: dict[str, torch.Tensor] = {"seeds": torch.tensor([r["seed"] for r in rows], dtype=torch.long)}
        for name in ("image_map", "image_embeds", "text_embeds", "pixel_stats"):
            if name in rows[0]:
                tensors[name] = torch.stack([r[name] for r in rows]).contiguous()
        if "text_tokens" in rows[0]:
            lengths = torch.tensor([r["text_tokens"].shape[0] for r in rows], dtype=torch.long)
            tensors["text_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            tensors["text_tokens"] = torch.cat([r["text_tokens"] for r in rows]).contiguous()
            tensors["text_mask"] = torch.cat([r["text_mask"] for r in rows]).to(torch.uint8)
            if rows[0]["text_ids"] is not None:
                tensors["text_ids"] = torch.cat([r["text_ids"] for r in rows])
        name = f"features-{len(self._shards):05d}.safetensors"
        save_file(tensors, os.path.join(self.directory, name),
                  metadata={"keys": json.dumps([r["key"] for r in rows], ensure_ascii=False)})
        self._shards.append({"file": name, "count": len(rows)})

    def close(self) -> str:
        """Write the last shard and the manifest; returns the manifest path."""
        self._flush()
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "dtype": str(self.dtype).replace("torch.", ""),
                    "features": self._shapes, "shards": self._shards,
                    "num_samples": sum(s["count"] for s in self._shards), **self.metadata}
        path = os.path.join(self.directory, MANIFEST_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, ensure_ascii=False)
            fh.write("\n")
        return path


class _OpenShard:
    """One shard file, memory-mapped: rows are read on demand, nothing is loaded whole but its text offsets."""

    def __init__(self, path: str) -> None:
        self.handle = safe_open(path, framework="pt")
        self.names = set(self.handle.keys())
        self.offsets = self.handle.get_tensor("text_offsets").tolist() if "text_offsets" in self.names else None

    def rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """`name[rows]`, reading each run of consecutive rows with one slice."""
        order = sorted(set(rows))
        runs, start = [], order[0]
        for prev, row in zip(order, order[1:] + [None]):
            if row != prev + 1:
                runs.append((start, prev + 1))
                start = row
        sliced = self.handle.get_slice(name)
        block = torch.cat([sliced[a:b] for a, b in runs]) if len(runs) > 1 else sliced[runs[0][0]:runs[0][1]]
        if order == rows:
            return block
        where = {row: i for i, row in enumerate(order)}
        return block[[where[r] for r in rows]]

    def span(self, name: str, row: int) -> torch.Tensor:
        """The ragged text rows of sample `row`."""
        return self.handle.get_slice(name)[self.offsets[row]:self.offsets[row + 1]]


class TeacherFeatureCache:
    """Read side: an index of (key, seed) -> (shard, row); features are read row by row from memory-mapped shard
    files, so the cache holds the features of the batch being looked up and nothing more (plus, per open shard,
    its text offsets: 8 bytes a sample; at most `open_shards` files are open at once). The index costs about
    200 bytes per cached sample."""

    def __init__(self, directory: str, *, open_shards: int = 8) -> None:
        path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise DataError(f"teacher cache {directory} has no {MANIFEST_NAME}; build it with "
                            "`vlmdistill cache-teacher <recipe>`")
        with open(path, encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("format") != CACHE_FORMAT or self.manifest.get("version") != CACHE_VERSION:
            raise DataError(f"{path} is not a version-{CACHE_VERSION} dcclip teacher cache; {REBUILD_HINT}")
        self.directory = directory
        self.open_shards = max(int(open_shards), 1)
        self._open: collections.OrderedDict[int, _OpenShard] = collections.OrderedDict()
        self.index: dict[tuple[str, int], tuple[int, int]] = {}
        for shard_idx, shard in enumerate(self.manifest["shards"]):
            file = os.path.join(directory, shard["file"])
            if not os.path.isfile(file):
                raise DataError(f"teacher cache {directory}: shard {shard['file']} is missing; {REBUILD_HINT}")
            with safe_open(file, framework="pt") as handle:
                keys = json.loads((handle.metadata() or {}).get("keys", "[]"))
                seeds = handle.get_tensor("seeds").tolist()
            for row, (key, seed) in enumerate(zip(keys, seeds)):
                self.index[(key, int(seed))] = (shard_idx, row)
        self.hits = 0
        self.misses = 0

    @property
    def features(self) -> dict[str, list[int]]:
        return self.manifest["features"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item: tuple[str, int]) -> bool:
        return item in self.index

    def close(self) -> None:
        """Close the open shard files (the index stays: lookups reopen them)."""
        self._open.clear()

    @property
    def open_files(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ checks
    def check(self, *, teacher_fingerprint: str | None, taps: dict | None, data_fingerprint: str | None,
              needs: Iterable[str]) -> None:
        """Refuse a cache built for another teacher, other taps, other data preprocessing, or lacking a
        feature the config needs."""
        where = f"teacher cache {self.directory}"
        stored = self.manifest.get("teacher_fingerprint")
        if teacher_fingerprint is not None and stored != teacher_fingerprint:
            raise DataError(f"{where} is stale: it was built from a teacher with fingerprint {stored}, but the "
                            f"teacher now has fingerprint {teacher_fingerprint} (different weights or class); "
                            f"{REBUILD_HINT}")
        if taps is not None and self.manifest.get("teacher_taps") != taps:
            raise DataError(f"{where} is stale: built with teacher taps {self.manifest.get('teacher_taps')}, the "
                            f"config now reads {taps}; {REBUILD_HINT}")
        stored_data = self.manifest.get("data_fingerprint")
        if data_fingerprint is not None and stored_data is not None and stored_data != data_fingerprint:
            raise DataError(f"{where} is stale: built for data preprocessing {stored_data}, the data pipeline is now "
                            f"{data_fingerprint} (image size, normalisation, augmentation or tokenizer changed); "
                            f"{REBUILD_HINT}")
        missing = sorted(set(needs) - set(self.features))
        if missing:
            raise DataError(f"{where} holds {sorted(self.features)} but the config needs {missing} as well; "
                            f"{REBUILD_HINT}")

    # ------------------------------------------------------------------ lookup
    def _shard(self, shard_idx: int) -> _OpenShard:
        if shard_idx in self._open:
            self._open.move_to_end(shard_idx)
            return self._open[shard_idx]
        opened = _OpenShard(os.path.join(self.directory, self.manifest["shards"][shard_idx]["file"]))
        self._open[shard_idx] = opened
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)
        return opened

    def missing(self, keys: list[str], seeds: list[int]) -> list[int]:
        """Positions of the samples not in the cache."""
        return [i for i, (k, s) in enumerate(zip(keys, seeds)) if (k, int(s)) not in self.index]

    def _gather(self, places: list[tuple[int, int]], name: str) -> torch.Tensor:
        """`name` of every sample in `places` (shard, row), in that order; one read per shard and run of rows."""
        by_shard: dict[int, list[int]] = collections.defaultdict(list)
        for i, (shard, _) in enumerate(places):
            by_shard[shard].append(i)
        out = None
        for shard, positions in by_shard.items():
            block = self._shard(shard).rows(name, [places[i][1] for i in positions])
            if out is None:
                out = block.new_empty(len(places), *block.shape[1:])
            out[positions] = block
        return out

    def lookup(self, keys: list[str], seeds: list[int], length: int | None, *, ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
               check_inputs: bool = True) -> TowerFeatures:
        """Features of a batch; text rows padded to `length` positions. With `check_inputs`, the batch's
        token ids and pixel statistics must match those the cache was built from."""
        places = []
        for key, seed in zip(keys, seeds):
            where = self.index.get((key, int(seed)))
            if where is None:
                raise DataError(f"teacher cache {self.directory} has no features for sample {key!r} with "
                                f"augmentation seed {int(seed)}; {REBUILD_HINT} over the training data")
            places.append(where)
        self.hits += len(places)
        shards = [self._shard(s) for s, _ in places]
        names = shards[0].names
        out = TowerFeatures()
        for name in ("image_map", "image_embeds", "text_embeds"):
            if name in names:
                setattr(out, name, self._gather(places, name))
        if "text_tokens" in names:
            spans = [(shard.offsets[r], shard.offsets[r + 1]) for shard, (_, r) in zip(shards, places)]
            longest = max(b - a for a, b in spans)
            length = longest if length is None else length
            if longest > length:
                key = keys[max(range(len(spans)), key=lambda i: spans[i][1] - spans[i][0])]
                raise DataError(f"teacher cache {self.directory}: sample {key!r} has {longest} cached text tokens "
                                f"but the batch has only {length} positions (tokenizer or max length changed); "
                                f"{REBUILD_HINT}")
            width = self.features["text_tokens"][0]
            rows = [shard.span("text_tokens", r) for shard, (_, r) in zip(shards, places)]
            tokens = torch.zeros(len(places), length, width, dtype=rows[0].dtype)
            text_mask = torch.zeros(len(places), length, dtype=torch.bool)
            for i, (shard, (_, r), row) in enumerate(zip(shards, places, rows)):
                tokens[i, :row.shape[0]] = row
                text_mask[i, :row.shape[0]] = shard.span("text_mask", r).bool()
            out.text_tokens, out.text_mask = tokens, text_mask
            if check_inputs and ids is not None and "text_ids" in names:
                cached_ids = [shard.span("text_ids", r) for shard, (_, r) in zip(shards, places)]
                self._check_ids(keys, seeds, cached_ids, ids, mask)
        if check_inputs and pixels is not None and "pixel_stats" in names:
            stored = self._gather(places, "pixel_stats")
            now = pixel_statistics(pixels)
            close = torch.isclose(now, stored, rtol=1e-4, atol=1e-6).all(dim=1)
            if not bool(close.all()):
                i = int((~close).nonzero()[0])
                raise DataError(f"teacher cache {self.directory} is stale for sample {keys[i]!r} (augmentation seed "
                                f"{int(seeds[i])}): its pixels differ from those the teacher saw (statistics "
                                f"{now[i].tolist()} vs cached {stored[i].tolist()}); the image preprocessing or "
                                f"augmentation changed; {REBUILD_HINT}")
        return out

    def _check_ids(self, keys, seeds, cached_ids: list[torch.Tensor], ids: torch.Tensor,
                   mask: torch.Tensor | None) -> None:
        ids = ids.detach().cpu()
        lengths = _valid_lengths(mask.cpu()).tolist() if mask is not None else None
        for i, cached in enumerate(cached_ids):
            n = cached.shape[0]
            same_length = lengths is None or lengths[i] == n
            if not same_length or ids.shape[1] < n or not torch.equal(ids[i, :n], cached):
                raise DataError(f"teacher cache {self.directory} is stale for sample {keys[i]!r} (augmentation seed "
                                f"{int(seeds[i])}): its token ids differ from those the teacher saw (tokenizer or "
                                f"caption changed); {REBUILD_HINT}")


def teacher_dims(cache: TeacherFeatureCache) -> dict[str, Optional[int]]:
    """Teacher widths recorded in a cache (used when no teacher is passed)."""
    f = cache.features
    return {"image_dim": f["image_map"][0] if "image_map" in f else None,
            "text_dim": f["text_tokens"][0] if "text_tokens" in f else None,
            "embed_dim": (f.get("text_embeds") or f.get("image_embeds") or [None])[0]}
