"""Teachers: a frozen external model, an EMA copy of the student, or the student's own base weights
with its PEFT adapters disabled.

Teachers are held outside `nn.Module` registration (see `DistillationPlugin.teacher`) so that they
never appear in `parameters()`, `state_dict()` or DDP's view of the wrapper.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) container to `device`, leaving everything else alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the core importable without it
        return False
    return isinstance(model, PeftModel)


def has_active_adapters(model: nn.Module) -> bool:
    """A PeftModel, or a transformers model with adapters injected by `add_adapter`."""
    return is_peft_model(model) or bool(getattr(model, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its own base: LoRA (or other PEFT) adapters off, no second copy of the weights."""
    if is_peft_model(model):
        with model.disable_adapter():
            yield model
    elif getattr(model, "_hf_peft_config_loaded", False):
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    else:
        raise ValueError("teacher='base' needs a student with PEFT adapters (LoRA etc.); this one has none")


class EMATeacher:
    """An exponential-moving-average copy of a module (momentum teachers of MSD, CCD, DINO-style methods).

    Plugins make one with `DistillationPlugin.ema_teacher(source)` in `setup()`, which also keeps it on the
    student's device and equal on every rank. `EMATeacher(source)` deep-copies `source` as it is then (unsharded;
    frozen, eval mode) and remembers it. `update(momentum)`: θ_t ← m·θ_t + (1−m)·θ_s for parameters with fused
    multi-tensor ops; buffers are copied (`buffers="copy"`, BatchNorm running stats follow the student) or averaged
    the same way (`buffers="ema"`); integer buffers (e.g. `num_batches_tracked`) are always copied.

    The source may be sharded after the copy was made, and the teacher placed as the user likes; the update
    stays exact and leaves the teacher identical on every rank:

    * teacher replicated, source FSDP2-sharded: each parameter's full value is all-gathered (one at a time);
    * teacher FSDP2-sharded like the source (`vlmdistill.shard(model, teacher="shard")`): local shards only,
      no communication;
    * source DeepSpeed ZeRO-3: its partitions are gathered a few parameters at a time (teacher replicated), or
      lerped partition by partition when the teacher is partitioned too.

    `prepare()` (run by `update` and by the plugin's `teacher_context`) moves an unsharded teacher to the source's
    device (`wrapped.to(device)` does not reach it: teachers are not registered modules) and, the first time it runs
    in a process group, makes the replicated copies equal to rank 0's (processes may have built different students
    before DDP broadcast rank 0's weights, and each copied its own).
    """

    #: elements of ZeRO-3 student parameters gathered at once during an update (bounds the temporary memory)
    gather_numel = 1 << 26

    def __init__(self, source: nn.Module, *, buffers: str = "copy") -> None:
        if buffers not in ("copy", "ema"):
            raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
        from .distributed import is_sharded, is_zero3

        if any(is_zero3(p) for p in source.parameters()):
            raise ValueError("EMATeacher copies its source (the student or a plugin head), but it is already "
                             "partitioned by DeepSpeed ZeRO-3. "
                             "transformers builds models partitioned (zero.Init) once TrainingArguments(deepspeed=...) "
                             "with ZeRO-3 exist: build and wrap the student before creating the TrainingArguments")
        if is_sharded(source):
            raise ValueError("EMATeacher copies its source (the student or a plugin head), but it is already "
                             "sharded (FSDP2 / ZeRO-3): build the "
                             "wrapper with vlmdistill.wrap() before sharding it (accelerate and vlmdistill.shard do)")
        self.buffer_mode = buffers
        self.source = source
        self.module = freeze(copy.deepcopy(source))
        self._synced = False  # made equal to rank 0's copy (once, in the first process group it meets)

    def _pairs(self):
        # Rebuilt every time: sharding replaces the source's parameter objects after the teacher was made.
        t_params = [p for _, p in self.module.named_parameters()]
        s_params = [p for _, p in self.source.named_parameters()]
        t_bufs = [b for _, b in self.module.named_buffers()]
        s_bufs = [b for _, b in self.source.named_buffers()]
        if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
            raise ValueError("EMA teacher and student no longer have the same parameters")
        return list(zip(t_params, s_params)), list(zip(t_bufs, s_bufs))

    def prepare(self, *, collective: bool = True) -> None:
        """Follow the source's device; with `collective`, take rank 0's values the first time a process group is
        initialised (a collective then: every rank must call it). Without, no communication (evaluation)."""
        self.follow()
        if collective and not self._synced:
            from .distributed import world_size

            if world_size() > 1:
                self.broadcast(src=0)
                self._synced = True

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step towards the source's current values (once per optimizer step, on every rank)."""
        from .distributed import gathered_parameters, is_zero3

        self.prepare()
        params, bufs = self._pairs()
        weight = 1.0 - float(momentum)
        gathered = [(t, s) for t, s in params if is_zero3(s) and not is_zero3(t)]
        direct = [(t, s) for t, s in params if not (is_zero3(s) and not is_zero3(t))]
        self._lerp(direct, weight)
        for chunk in _chunks(gathered, self.gather_numel):
            with gathered_parameters([s for _, s in chunk]):
                self._lerp(chunk, weight)
        float_bufs = [(t, s) for t, s in bufs if t.is_floating_point()]
        if float_bufs:
            ts = [t for t, _ in float_bufs]
            ss = [s.to(t.dtype) for t, s in float_bufs]
            if self.buffer_mode == "ema":
                torch._foreach_lerp_(ts, ss, weight)
            else:
                torch._foreach_copy_(ts, ss)
        for t, s in bufs:
            if not t.is_floating_point():
                t.copy_(s)

    @staticmethod
    def _lerp(pairs, weight: float) -> None:
        # Group by (device, dtype): _foreach ops need matching tensor lists.
        groups: dict[tuple, tuple[list, list]] = {}
        for t, s in pairs:
            t_local, s_value = _aligned(t, s.detach())
            g = groups.setdefault((t_local.device, t_local.dtype), ([], []))
            g[0].append(t_local)
            g[1].append(s_value.to(t_local.dtype) if s_value.dtype != t_local.dtype else s_value)
        for ts, ss in groups.values():
            torch._foreach_lerp_(ts, ss, weight)

    def follow(self) -> None:
        """Move the (unsharded) teacher to the source's device and floating dtype (`wrapped.to(torch.bfloat16)`
        casts the student, not this unregistered copy)."""
        from .distributed import is_sharded

        if is_sharded(self.module):
            return
        device, dtype = module_device(self.source), _floating_dtype(self.source)
        if module_device(self.module) != device or _floating_dtype(self.module) != dtype:
            self.module.to(device=device, dtype=dtype)  # casts floating tensors only

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Replicated tensors take rank `src`'s values (processes may have built different students before
        DDP broadcast rank 0's weights); shards are left alone. A collective."""
        import torch.distributed as dist

        from .distributed import is_dtensor, is_zero3, world_size

        if world_size() == 1:
            return
        for tensor in (*self.module.parameters(), *self.module.buffers()):
            if not (is_dtensor(tensor) or is_zero3(tensor)):
                dist.broadcast(tensor.data, src=src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Full or sharded values; full values are cut to this rank's shard when the teacher is sharded."""
        from .distributed import is_dtensor

        own = self.module.state_dict()
        state = {k: _shard_like(own[k], v.reshape(own[k].shape))  # (a 0-dim value for a held 1-element one)
                 if k in own and is_dtensor(own[k]) and not is_dtensor(v) else v for k, v in state.items()}
        self.module.load_state_dict(state)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _aligned(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher tensor to update in place, the student values it averages in), laid out alike."""
    from .distributed import is_dtensor, is_zero3

    if is_zero3(teacher):  # partitioned the same way: partition by partition
        return teacher.ds_tensor, student.ds_tensor
    if is_dtensor(teacher):
        if not is_dtensor(student):
            return teacher.to_local(), _shard_like(teacher, student).to_local()
        if student.placements != teacher.placements or student.device_mesh != teacher.device_mesh:
            student = student.redistribute(teacher.device_mesh, teacher.placements)
        return teacher.to_local(), student.to_local()
    if is_dtensor(student):
        return teacher, student.full_tensor()
    return teacher, student


def _shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) as a DTensor laid out like `like`, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _chunks(pairs: list, numel: int) -> Iterator[list]:
    chunk, size = [], 0
    for pair in pairs:
        n = int(getattr(pair[1], "ds_numel", pair[1].numel()))
        if chunk and size + n > numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += n
    if chunk:
        yield chunk
