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


@contextlib.contextmanager
def teacher_mode(teacher: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for a teacher forward, whatever the caller's mode."""
    teacher.eval()
    with torch.no_grad():
        yield


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
    """An exponential-moving-average copy of a module, updated with fused multi-tensor ops.

    `update(student, momentum)`: θ_t ← m·θ_t + (1−m)·θ_s for parameters (one `_foreach_lerp_`);
    buffers are copied (`buffers="copy"`, BatchNorm running stats follow the student) or averaged
    the same way (`buffers="ema"`). Integer buffers (e.g. `num_batches_tracked`) are always copied.
    """

    def __init__(self, student: nn.Module, *, buffers: str = "copy") -> None:
        if buffers not in ("copy", "ema"):
            raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
        self.buffer_mode = buffers
        self.module = freeze(copy.deepcopy(student))
        self._pairs_cache: tuple | None = None

    def _pairs(self, student: nn.Module):
        key = id(student)
        if self._pairs_cache is None or self._pairs_cache[0] != key:
            t_params = [p for _, p in self.module.named_parameters()]
            s_params = [p for _, p in student.named_parameters()]
            t_bufs = [b for _, b in self.module.named_buffers()]
            s_bufs = [b for _, b in student.named_buffers()]
            if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
                raise ValueError("EMA teacher and student no longer have the same parameters")
            float_bufs = [(t, s) for t, s in zip(t_bufs, s_bufs) if t.is_floating_point()]
            other_bufs = [(t, s) for t, s in zip(t_bufs, s_bufs) if not t.is_floating_point()]
            self._pairs_cache = (key, t_params, s_params, float_bufs, other_bufs)
        return self._pairs_cache[1:]

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        t_params, s_params, float_bufs, other_bufs = self._pairs(student)
        weight = 1.0 - float(momentum)
        # Group by (device, dtype): _foreach ops need matching tensor lists.
        groups: dict[tuple, tuple[list, list]] = {}
        for t, s in zip(t_params, s_params):
            g = groups.setdefault((t.device, t.dtype), ([], []))
            g[0].append(t)
            g[1].append(s.detach().to(t.dtype) if s.dtype != t.dtype else s.detach())
        for ts, ss in groups.values():
            torch._foreach_lerp_(ts, ss, weight)
        if float_bufs:
            ts = [t for t, _ in float_bufs]
            ss = [s.to(t.dtype) for t, s in float_bufs]
            if self.buffer_mode == "ema":
                torch._foreach_lerp_(ts, ss, weight)
            else:
                torch._foreach_copy_(ts, ss)
        for t, s in other_bufs:
            t.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
