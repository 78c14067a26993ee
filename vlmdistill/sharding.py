"""FSDP2 layout of a distillation model, and the parameter shapes sharding needs.

The layout is accelerate's: one `fully_shard` unit per transformer block of the student, the wrapper returned
by `wrap()` as the root unit (plugin parameters live there). The teacher is the user's choice:

* ``"replicate"``: left as it is (a full copy per rank, on whatever device the user put it);
* ``"shard"``: sharded the same way (one unit per block, the teacher as its own root), resharded after every
  forward, so each rank holds 1/world of the teacher plus one block while it runs;
* ``"offload"``: sharded, with the shards in CPU memory (`CPUOffloadPolicy`), gathered block by block.

FSDP2 shards along dim 0 and refuses 0-dim parameters (CLIP's `logit_scale`, plugin temperatures), so
`ScalarParameters` holds them as 1-element tensors while wrapped; state dicts keep their original shape.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

from .distributed import is_dtensor
from .errors import ConfigError

TEACHER_PLACEMENTS = ("replicate", "shard", "offload")
_BLOCK_LISTS = ("layers", "layer", "blocks", "h", "resblocks")


# ------------------------------------------------------------------------------------------ block classes
def block_classes(model: nn.Module) -> list[type]:
    """The transformer block classes of `model`: the element classes of its lists of repeated blocks (decoder
    and encoder layers), restricted to its `_no_split_modules` when it names them.

    Not `_no_split_modules` as it is: it also lists embedding modules (kept whole for device maps; as FSDP units
    they split accelerate's input-embedding unit, e.g. ViT's patch embedding inside `ViTEmbeddings`) and classes
    the model does not contain (LLaVA names other checkpoints' vision towers, which accelerate refuses)."""
    repeated: dict[str, type] = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            block = module[0]
            if any(True for _ in block.parameters()):
                repeated.setdefault(type(block).__name__, type(block))
    named = set(getattr(model, "_no_split_modules", None) or [])
    chosen = [cls for n, cls in repeated.items() if n in named]
    if chosen:
        return chosen
    return [cls for n, cls in repeated.items()
            if any(path.rsplit(".", 1)[-1] in _BLOCK_LISTS for path, m in model.named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) and type(m[0]) is cls)]


def block_class_names(model: nn.Module) -> list[str]:
    """`block_classes` by name, as `fsdp_config["transformer_layer_cls_to_wrap"]` and accelerate configs take them."""
    return [cls.__name__ for cls in block_classes(model)]


# ------------------------------------------------------------------------------------------------ FSDP2
def shard_blocks(model: nn.Module, classes: Iterable[type] | None = None, *, root: bool = True,
                 **fsdp_kwargs: Any) -> nn.Module:
    """`fully_shard` each block of `model`, then (`root`) `model` itself as the root unit."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    classes = tuple(classes if classes is not None else block_classes(model))
    for module in list(model.modules())[1:]:
        if classes and isinstance(module, classes) and not isinstance(module, FSDPModule):
            fully_shard(module, **fsdp_kwargs)
    if root and not isinstance(model, FSDPModule):
        fully_shard(model, **fsdp_kwargs)
    return model


def shard_teacher(teacher: nn.Module, placement: str = "shard", **fsdp_kwargs: Any) -> nn.Module:
    """Shard a frozen teacher like the student (`placement` 'shard'), or with CPU-offloaded shards ('offload').

    Every unit, the root included, reshards after its forward: a teacher has no backward that would reuse the
    gathered parameters."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if placement not in ("shard", "offload"):
        raise ConfigError(f"teacher placement {placement!r}: shard_teacher takes 'shard' or 'offload'")
    kwargs = {**fsdp_kwargs, "reshard_after_forward": True}
    if placement == "offload":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return shard_blocks(teacher, **kwargs)


def shard(wrapped: nn.Module, *, teacher: str = "replicate", **fsdp_kwargs: Any) -> nn.Module:
    """Apply FSDP2 to a `vlmdistill.wrap` model in accelerate's layout (student blocks, then the wrapper as
    root) and place the teacher (`teacher`: 'replicate', 'shard' or 'offload'). `fsdp_kwargs` go to every
    `fully_shard` call (mesh, mp_policy, reshard_after_forward, ...). Call it on every rank, after wrap()."""
    from .api import unwrap_parallel
    from .model import DistillationModel

    inner = unwrap_parallel(wrapped)
    if not isinstance(inner, DistillationModel):
        raise TypeError(f"shard() needs a model returned by vlmdistill.wrap, got {type(wrapped).__name__}")
    if teacher not in TEACHER_PLACEMENTS:
        raise ConfigError(f"teacher={teacher!r}: choose one of {list(TEACHER_PLACEMENTS)}")
    plugin = inner.plugin
    if teacher != "replicate":
        if plugin.teacher is None:
            raise ConfigError(f"teacher={teacher!r}: plugin {plugin.name!r} has no teacher to place")
        if plugin.teacher_is_student_base:
            raise ConfigError("teacher='base' is the student itself: it is sharded with the student; "
                              "use teacher='replicate'")
        plugin.shard_teacher(teacher, **{k: v for k, v in fsdp_kwargs.items() if k != "reshard_after_forward"})
    # The student's parameters outside its blocks stay in the wrapper's unit: plugins read some of them after the
    # student's forward (CLIP's logit_scale), when a unit of the student alone would be resharded already.
    shard_blocks(inner.student, block_classes(inner.student), root=False, **fsdp_kwargs)
    return shard_blocks(inner, (), **fsdp_kwargs)


# ---------------------------------------------------------------------------------------- 0-dim parameters
class ScalarParameters:
    """0-dim parameters of a module tree held as 1-element tensors (same `nn.Parameter` objects), with
    state-dict hooks that give them back their 0-dim shape on save and accept 0-dim values on load."""

    def __init__(self) -> None:
        self._held: list[tuple[nn.Module, tuple[str, ...]]] = []
        self._handles: list[Any] = []

    def hold(self, model: nn.Module) -> "ScalarParameters":
        for module in model.modules():
            names = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 0)
            if not names or any(m is module for m, _ in self._held):
                continue
            for name in names:
                param = getattr(module, name)
                param.data = param.data.reshape(1)
            self._held.append((module, names))
            self._handles.append(module.register_state_dict_post_hook(_squeezing_hook(names)))
            self._handles.append(module.register_load_state_dict_pre_hook(functools.partial(_unsqueeze, names=names)))
        return self

    def release(self) -> None:
        """Remove the hooks and give unsharded parameters back their 0-dim shape."""
        while self._handles:
            self._handles.pop().remove()
        while self._held:
            module, names = self._held.pop()
            for name in names:
                param = getattr(module, name)
                if not is_dtensor(param) and param.shape == (1,):
                    param.data = param.data.reshape(())


def _squeezing_hook(names: tuple[str, ...]):
    def hook(module, state_dict, prefix, local_metadata):
        squeeze_scalars(state_dict, prefix, names)

    hook.reapply_on_full_state = True  # full_state_dict runs it again on the gathered (plain) tensors
    return hook


def squeeze_scalars(state_dict: dict[str, torch.Tensor], prefix: str, names: Iterable[str]) -> None:
    for name in names:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == (1,):
            state_dict[prefix + name] = value.reshape(())


def _unsqueeze(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs, *,
               names):
    for name in names:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)
