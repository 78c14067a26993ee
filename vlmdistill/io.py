"""Saving and loading: the student in its native format, plugin state as safetensors.

Tied weights (e.g. input embeddings shared with the LM head) appear under several state-dict keys
that share one storage; safetensors refuses those, so `save_tensors` stores each storage once and
records the aliases in the file's metadata, and `load_tensors` restores them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import is_dtensor, is_main_process
from .errors import DataError
from .teachers import is_peft_model

PLUGIN_CONFIG_NAME = "vlmdistill_plugin.json"
PLUGIN_STATE_NAME = "vlmdistill_plugin_state.safetensors"
GENERIC_WEIGHTS_NAME = "model.safetensors"


def find_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias key: kept key} for entries that view the same memory as an earlier entry."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta" or is_dtensor(tensor):
            continue
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def save_tensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    aliases = find_aliases(state)
    unique = {k: v.detach().contiguous() for k, v in state.items() if k not in aliases}
    # Views of a larger storage that are not exact aliases still share memory: copy them apart.
    unique = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
              for k, v in unique.items()}
    meta = dict(metadata or {})
    meta["vlmdistill_aliases"] = json.dumps(aliases)
    save_file(unique, path, metadata=meta)


def load_tensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise DataError(f"missing file {path}")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    state = load_file(path, device=str(device))
    for alias, kept in json.loads(meta.get("vlmdistill_aliases", "{}")).items():
        state[alias] = state[kept]
    return state


def save_student(student: nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Native format: `save_pretrained` for transformers / PEFT models, else `model.safetensors`.
    `state_dict` replaces `student.state_dict()` (the gathered state of a sharded student). Only rank 0 writes."""
    if not is_main_process():
        return
    os.makedirs(directory, exist_ok=True)
    if hasattr(student, "save_pretrained"):
        student.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
    else:
        save_tensors(student.state_dict() if state_dict is None else state_dict,
                     os.path.join(directory, GENERIC_WEIGHTS_NAME))


def load_student(directory: str, into: nn.Module | None = None) -> nn.Module:
    """Load a student saved by `save_student`.

    With `into`, the saved weights are copied into that object (same class as saved), which is how a
    resumed run keeps the user's own model object (PEFT wrapping, device placement). Without it, a
    transformers model is rebuilt from its config.
    """
    if into is not None and is_peft_model(into):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        adapter = into.active_adapter
        set_peft_model_state_dict(into, load_peft_weights(directory, device="cpu"), adapter_name=adapter)
        return into
    if into is not None and hasattr(into, "save_pretrained") and hasattr(type(into), "from_pretrained"):
        loaded = type(into).from_pretrained(directory, dtype=next(into.parameters()).dtype)
        missing, unexpected = into.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise DataError(f"{directory}: weights do not fit {type(into).__name__} "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return into
    if into is not None:
        into.load_state_dict(load_tensors(os.path.join(directory, GENERIC_WEIGHTS_NAME)))
        return into
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise DataError(f"{directory} holds no config.json; pass the student object: load(dir, model=...)")
    import transformers

    with open(config_path) as fh:
        architectures = json.load(fh).get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise DataError(f"{config_path}: architecture {architectures} is not a transformers class; "
                        "pass the student object: load(dir, model=...)")
    return cls.from_pretrained(directory)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError(f"missing file {path}")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
