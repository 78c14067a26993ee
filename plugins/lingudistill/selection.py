"""Which samples are distilled: `kd_mask` from the batch, else the dataset-category table, else the default."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlmdistill.errors import ConfigError

from .config import LinguDistillConfig


def _names(value: Any) -> list[str | None]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, torch.Tensor):
        raise ConfigError("the batch's `dataset` must hold dataset names (strings), not a tensor; pass per-sample "
                          "flags as `kd_mask` instead")
    return [None if v is None or v == "" else str(v) for v in value]


def sample_kd_mask(config: LinguDistillConfig, extras: dict[str, Any], batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """`[B]` bool: True where the sample is language-intensive and gets the KD term."""
    kd_mask = extras.get("kd_mask")
    if kd_mask is not None:
        mask = torch.as_tensor(kd_mask, device=device).reshape(-1)
        if mask.numel() != batch_size:
            raise ConfigError(f"kd_mask has {mask.numel()} entries for a batch of {batch_size}")
        return mask.bool()
    datasets = extras.get("dataset")
    if datasets is not None:
        names = _names(datasets)
        if len(names) != batch_size:
            raise ConfigError(f"the batch's `dataset` has {len(names)} entries for a batch of {batch_size}")
        return torch.tensor([distil_dataset(config, n) for n in names], dtype=torch.bool, device=device)
    return torch.full((batch_size,), config.kd_by_default, dtype=torch.bool, device=device)


def distil_dataset(config: LinguDistillConfig, name: str | None) -> bool:
    if name is None:  # a sample without a dataset name
        return config.kd_by_default
    category = config.dataset_categories.get(name)
    if category is None:
        if config.unknown_dataset == "error":
            known: Sequence[str] = sorted(config.dataset_categories)
            raise ConfigError(f"dataset {name!r} is not in dataset_categories (known: {', '.join(known) or 'none'}); "
                              "add it, or set unknown_dataset='distill' or 'skip'")
        return config.unknown_dataset == "distill"
    return category in config.distill_categories
