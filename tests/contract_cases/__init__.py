"""One module per plugin, named like the plugin, defining `case() -> ContractCase`.

The contract tests run every check for every registered plugin; a plugin without a module here
fails them, so a new plugin cannot skip the contract.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch


@dataclasses.dataclass
class ContractCase:
    make_student: Callable[[], torch.nn.Module]
    #: teacher for a given student (None for plugins that build their own)
    make_teacher: Callable[[torch.nn.Module], Any]
    config: dict
    #: n examples (dicts of un-batched tensors), deterministic in `seed`
    examples: Callable[[int, int], list[dict]]
    collate: Callable[[list[dict]], dict]
    #: the Trainer's `num_items_in_batch` for a window of batches (None: the plugin's loss is a per-batch mean)
    num_items: Callable[[list[dict]], Any] = lambda batches: None
    #: Trainer class to use: "Trainer" (+ DistillationCallback) or "DistillationTrainer"
    trainer: str = "Trainer"
    #: does the student save/load through transformers' from_pretrained?
    hf_student: bool = True
    #: plugin-specific wrap() objects (tokenizers ...)
    runtime: dict = dataclasses.field(default_factory=dict)

    def batch(self, n: int, seed: int = 0) -> dict:
        return self.collate(self.examples(n, seed))


def load_case(plugin: str) -> ContractCase:
    try:
        module = importlib.import_module(f"contract_cases.{plugin}")
    except ModuleNotFoundError as exc:
        raise AssertionError(f"plugin {plugin!r} has no contract case: add tests/contract_cases/{plugin}.py") from exc
    return module.case()
