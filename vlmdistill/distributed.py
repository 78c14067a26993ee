"""Data-parallel helpers in one place: the process group, reductions, and access to sharded parameters.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a parameter outside its unit's forward is a DTensor holding
this rank's shard; under DeepSpeed ZeRO-3 it is an empty placeholder whose partition lives in `param.ds_tensor`.
Code that touches student parameters outside a forward (EMA updates, clamps, exports) goes through these helpers
instead of reading `.data`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


# ------------------------------------------------------------------------------------------ process group
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return world()[1]


def is_main_process() -> bool:
    return world()[0] == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(local: torch.Tensor, *, differentiable: bool = False) -> tuple[torch.Tensor, int]:
    """All processes' `[n_r, ...]` rows concatenated in rank order, and this process's row offset.
    Sizes may differ between processes (a ragged last batch): the row counts are exchanged first and every rank
    sends its rows padded to the largest count, since an all-gather of unequal shapes fails or hangs.
    `differentiable`: the gradient of the result flows back to each rank's own rows (contrastive losses over the
    global batch: each rank's gradient then holds every rank's contribution to its rows)."""
    rank, size = world()
    if size == 1:
        return local, 0
    count = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0],) + tuple(local.shape[1:]))])
    local = local.contiguous()
    if differentiable:
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of functional collectives, still differentiable
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(local)
    else:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), sum(counts[:rank])


# ------------------------------------------------------------------------------------- sharded parameters
def is_dtensor(tensor: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_zero3(tensor: object) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def is_sharded(module: nn.Module) -> bool:
    """Does any parameter of `module` live in FSDP2 shards or ZeRO-3 partitions?"""
    return any(is_dtensor(p) or is_zero3(p) for p in module.parameters())


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, a ZeRO-3 partition, else the tensor itself."""
    if is_dtensor(tensor):
        return tensor.to_local()
    if is_zero3(tensor):
        return tensor.ds_tensor
    return tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every rank must call it); other tensors as they are.
    ZeRO-3 parameters must be gathered with `gathered_parameters` first."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@contextlib.contextmanager
def gathered_parameters(params: Iterable[torch.Tensor], *, modify: bool = False) -> Iterator[None]:
    """Inside: ZeRO-3 partitioned parameters hold their full value (`modify=True`: changes made on rank 0 are
    partitioned back to every rank). A no-op for other parameters."""
    zero3 = [p for p in params if is_zero3(p)]
    if zero3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Whole already (persistent small tensors, or inside their module's forward): gathering would release them
        # on exit behind ZeRO-3's back. In-place changes to them happen alike on every rank.
        zero3 = [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


def fsdp_unit_of(root: nn.Module, module: nn.Module) -> nn.Module | None:
    """The FSDP2 unit (the nearest `fully_shard`-ed module at or above `module` inside `root`) that owns
    `module`'s parameters, or None when they are not sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    path = next((name for name, m in root.named_modules() if m is module), None)
    if path is None:
        return None
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        candidate = root.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


@contextlib.contextmanager
def unsharded(root: nn.Module, module: nn.Module) -> Iterator[None]:
    """Run `module` (a part of `root`) outside `root`'s forward, e.g. a teacher's LM head applied to chunks of
    rows after the teacher's forward: its FSDP2 unit is all-gathered for the duration (then resharded) and
    ZeRO-3 parameters are gathered. A no-op for unsharded modules and for units that are unsharded already."""
    params = list(module.parameters())
    unit = fsdp_unit_of(root, module) if any(is_dtensor(p) for p in params) else None
    if unit is not None and unit is not module:
        unit.unshard()
        try:
            yield
        finally:
            unit.reshard()
        return
    with gathered_parameters(params):
        yield


def full_state_dict(module: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every sharded tensor gathered to its full value, on the CPU.

    FSDP2 DTensors are all-gathered one at a time; ZeRO-3 parameters are gathered module by module (never the
    whole model at once). A collective: every rank must call it. With `rank0_only` other ranks get `{}`."""
    rank, _ = world()
    keep = rank == 0 or not rank0_only
    if any(is_zero3(p) for p in module.parameters()):
        return _zero3_full_state_dict(module, keep)
    out = {}
    for key, value in module.state_dict().items():
        value = full_tensor(value)
        if keep:
            out[key] = value.detach().cpu()
    if keep:
        _reapply_full_state_hooks(module, out)
    return out


def _reapply_full_state_hooks(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """State-dict post-hooks that only act on plain tensors (they saw DTensors) run again on the gathered ones,
    also for the modules behind a plugin's hidden state (EMA teachers)."""
    for name, mod in module.named_modules():
        mod_prefix = f"{prefix}{name}." if name else prefix
        for hook in mod._state_dict_hooks.values():
            if getattr(hook, "reapply_on_full_state", False):
                hook(mod, state, mod_prefix, {})
        hidden_modules = getattr(mod, "hidden_modules", None)
        if callable(hidden_modules):
            for key_prefix, hidden in hidden_modules().items():
                _reapply_full_state_hooks(hidden, state, f"{mod_prefix}hidden.{key_prefix}")


def _zero3_full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """`nn.Module.state_dict`'s recursion (own tensors, children, then the module's post-hooks), with each
    module's own parameters gathered only while they are read."""
    out: dict[str, torch.Tensor] = {}

    def visit(mod: nn.Module, prefix: str) -> None:
        with gathered_parameters(list(mod.parameters(recurse=False))):
            if keep:
                own: dict[str, torch.Tensor] = {}
                mod._save_to_state_dict(own, prefix, keep_vars=False)
                out.update({k: v.detach().cpu().clone() for k, v in own.items()})
        for name, child in mod.named_children():
            visit(child, f"{prefix}{name}.")
        if keep:
            for hook in mod._state_dict_hooks.values():
                hook(mod, out, prefix, {})

    visit(module, "")
    return out
