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


def tensors_metadata(path: str) -> dict[str, str]:
    """The metadata of a safetensors file; a missing, truncated or damaged file is a `DataError` naming it."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise DataError(f"missing file {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path} is damaged or truncated ({exc})") from None


def load_tensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    meta = tensors_metadata(path)
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
    from transformers import PreTrainedModel

    if isinstance(into, PreTrainedModel):
        _load_transformers_weights(into, directory)
        return into
    if into is not None:
        path = os.path.join(directory, GENERIC_WEIGHTS_NAME)
        state = load_tensors(path)
        _check_fits(into.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, path, type(into).__name__)
        into.load_state_dict(state)
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


def _check_fits(target: dict[str, torch.Tensor], saved_shapes: dict[str, tuple], where: str, model_name: str,
                optional: set[str] = frozenset()) -> None:
    """Refuse (before anything is copied) saved weights whose keys or shapes differ from the model's."""
    missing = sorted(set(target) - set(saved_shapes) - set(optional))
    unexpected = sorted(set(saved_shapes) - set(target))
    wrong = [f"{k}: saved {saved_shapes[k]}, model {tuple(target[k].shape)}"
             for k in sorted(set(saved_shapes) & set(target)) if tuple(target[k].shape) != saved_shapes[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if items]
        raise DataError(f"{where}: the saved weights do not fit {model_name} ({'; '.join(parts)})")


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map", {})
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise DataError(f"{directory} holds no model.safetensors (or sharded index): nothing to load")


def _load_transformers_weights(into: nn.Module, directory: str) -> None:
    """Copy a `save_pretrained` folder's weights into the existing model `into`, in place and tensor by tensor
    (no second model is built), after checking the folder's model type and every key and shape."""
    from safetensors import safe_open

    config = read_json(os.path.join(directory, "config.json"))
    own_type = getattr(getattr(into, "config", None), "model_type", None)
    if config.get("model_type") != own_type:
        raise DataError(f"{directory} holds a {config.get('model_type')!r} model ({config.get('architectures')}); "
                        f"the model given is {type(into).__name__} ({own_type!r})")
    own = into.state_dict()
    target = _saved_format(into, own)
    files = _weight_files(directory)
    saved: dict[str, tuple] = {}
    for path in files:
        tensors_metadata(path)  # names a truncated shard
        with safe_open(path, framework="pt") as handle:
            saved.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    # Tied weights are saved once: a key absent from the files is fine if it shares memory with a saved one.
    saved_ptrs = {target[k].data_ptr() for k in saved if k in target}
    tied = {k for k, v in target.items() if k not in saved and v.data_ptr() in saved_ptrs}
    _check_fits(target, saved, directory, type(into).__name__, optional=tied)
    own_ptrs = {v.data_ptr() for v in own.values()}
    if any(v.data_ptr() not in own_ptrs for v in target.values()):
        # The model's saved format is not a renaming of its own tensors (fused/split weights): let transformers
        # convert, at the cost of a temporary second copy.
        loaded = type(into).from_pretrained(directory, dtype=next(into.parameters()).dtype)
        into.load_state_dict(loaded.state_dict())
        return
    with torch.no_grad():
        for path in files:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    target[key].copy_(handle.get_tensor(key))


def _saved_format(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the key names `save_pretrained` writes (transformers renames some on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: keys are saved as they are
        return state
    return dict(revert_weight_conversion(model, dict(state)))
