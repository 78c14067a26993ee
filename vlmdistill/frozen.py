"""Parameters a plugin holds still for a while get no optimizer update at all.

A zero gradient is not a freeze: AdamW still steps such a parameter (weight decay) and advances its moments, so at
the unfreeze it takes updates several times larger than a fresh Adam would. The only freeze an optimizer honours is
`param.grad = None` when it steps. The gradient is still computed (the parameter stays in the graph, so DDP's
reduction and gradient accumulation see the same parameters every step) and is dropped right before the step,
after DDP has reduced it and after gradient clipping has read it — where the reference implementations of DINO and
CCD drop it (`cancel_gradients_last_layer`).

The drop runs in a global optimizer step pre-hook, so it holds in every loop (HF Trainer, accelerate, a hand-written
loop, a GradScaler's step) without the user calling anything.

DeepSpeed ZeRO-3 steps its inner optimizer on flat fp32 partitions, several parameters to a tensor, so no single
gradient can be dropped there, and a parameter the step's forwards did not use gets a zero gradient instead of
none (which momentum and weight decay still move; torch optimizers skip it). So under ZeRO-3 the parameters to
hold still are the frozen ones and those no rank gave a gradient since the last step (seen by gradient hooks);
the pre-hook copies each one's slice of the partition and of the optimizer's per-element state (momentum,
moments), and the matching post-hook writes them back before ZeRO-3 copies the partition into the parameters:
the parameter and its state come out of the step untouched (a state the step created is zeroed: a fresh one).
Scalar state shared by the whole partition (Adam's step count) still advances.

A frozen parameter still gets an optimizer state: for Adam and AdamW (the Trainer's default) and SGD with momentum
the hook writes one the first update after the freeze treats exactly as a fresh start (`_give_fresh_state`), so
every trainable parameter has a state to checkpoint. Without it a distributed
checkpoint saved during the freeze cannot be loaded strictly (torch.distributed.checkpoint's `set_state_dict`
and accelerate's FSDP2 resume refuse a trainable parameter with no saved optimizer state).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import (_get_scalar_dtype, register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.utils.hooks import RemovableHandle

from .distributed import all_reduce_sum, is_zero3


class FrozenGradientHooks:
    """The global optimizer step hooks of one wrapper; `remove()` takes them off."""

    def __init__(self, wrapper: Any) -> None:
        ref = weakref.ref(wrapper)
        self._zero3 = _Zero3Usage()
        restores: dict[int, list[Callable[[], None]]] = {}  # id(optimizer) -> what its post-hook writes back

        def before(optimizer, args, kwargs):
            owner = ref()
            if owner is None:
                return None
            frozen = owner.plugin.frozen_parameters()
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for param in frozen:
                if id(param) in held:
                    param.grad = None
                    _give_fresh_state(optimizer, param)
            if self._zero3.steps(optimizer):
                still = self._zero3.held_still(frozen, int(owner.plugin.global_step))
                restores[id(optimizer)] = [r for p in still if (r := _zero3_snapshot(optimizer, p)) is not None]
            return None

        def after(optimizer, args, kwargs):
            for restore in restores.pop(id(optimizer), []):
                restore()

        self._handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]

    def track_zero3(self, module: nn.Module) -> None:
        """Once `module`'s parameters are ZeRO-3 partitions (DeepSpeed initialised), watch which get gradients."""
        if not self._zero3.params:
            first = next(module.parameters(), None)
            if first is not None and is_zero3(first):
                self._handles += self._zero3.watch([p for p in module.parameters() if p.requires_grad])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Zero3Usage:
    """Which watched ZeRO-3 parameters got a gradient on any rank since the last optimizer step."""

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self._seen: set[int] = set()
        self._step: int | None = None
        self._still: list[nn.Parameter] = []

    def steps(self, optimizer: torch.optim.Optimizer) -> bool:
        """Is `optimizer` ZeRO-3's inner optimizer of the watched parameters?"""
        return bool(self.params) and _is_zero3_inner(optimizer, self.params[0])

    def watch(self, params: list[nn.Parameter]) -> list[RemovableHandle]:
        self.params = params
        return [p.register_post_accumulate_grad_hook(lambda p: self._seen.add(id(p))) for p in params]

    def held_still(self, frozen: list[nn.Parameter], step: int) -> list[nn.Parameter]:
        """The frozen parameters and the unused ones, decided once per optimizer step (the inner optimizer steps
        once per partition group) and alike on every rank (a collective: every rank steps)."""
        if step != self._step:
            used = torch.tensor([id(p) in self._seen for p in self.params], dtype=torch.int32)
            all_reduce_sum(used)
            frozen_ids = {id(p) for p in frozen}
            self._still = [p for p, n in zip(self.params, used.tolist()) if n == 0 or id(p) in frozen_ids]
            self._seen.clear()
            self._step = step
        return self._still


def drop_frozen_gradients(wrapper: Any) -> FrozenGradientHooks:
    """Install the hooks for `wrapper` (a `DistillationModel`): before any optimizer step, `.grad = None` for the
    parameters its plugin's `frozen_parameters()` names that the stepping optimizer holds (ZeRO-3 partitions, and
    partitions without a gradient: their slices restored after the step). Remove them on unwrap."""
    return FrozenGradientHooks(wrapper)


def _is_zero3_inner(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> bool:
    zero3 = getattr(param, "_z3_optimizer", None)  # set by DeepSpeed's ZeRO-3 optimizer on its parameters
    return zero3 is not None and any(optimizer is getattr(zero3, name, None)
                                     for name in ("optimizer", "backup_optimizer"))


def _zero3_snapshot(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> Callable[[], None] | None:
    """If `optimizer` (ZeRO-3's inner optimizer, stepping one flat fp32 partition at a time) is about to step
    `param`'s partition: a function that puts this rank's slice of it back as it is now, with the slices of the
    per-element optimizer state (a state this step creates is zeroed instead: a fresh one)."""
    if not _is_zero3_inner(optimizer, param):
        return None
    local = param._z3_optimizer.get_local_fp32_param(param)  # a view into one flat partition
    if local is None or local.numel() == 0:
        return None
    start = local.storage_offset()
    flat = next((t for group in optimizer.param_groups for t in group["params"]
                 if t.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
                 and t.storage_offset() <= start < t.storage_offset() + t.numel()), None)
    if flat is None:  # another sub-group is stepping
        return None
    offset, count = start - flat.storage_offset(), local.numel()

    def per_element_state() -> dict[str, torch.Tensor]:
        state = optimizer.state.get(flat, {})
        return {k: v.view(-1).narrow(0, offset, count) for k, v in state.items()
                if torch.is_tensor(v) and v.shape == flat.shape}

    value = local.detach().clone()
    state = {k: v.clone() for k, v in per_element_state().items()}

    def restore() -> None:
        with torch.no_grad():
            local.copy_(value)
            for key, view in per_element_state().items():
                view.copy_(state[key]) if key in state else view.zero_()

    return restore


def _give_fresh_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
    """If `param` has no state yet, write one its first real step treats exactly as a fresh start: Adam/AdamW's
    (what `torch.optim.Adam._init_group` creates: step 0, zero moments) and SGD's with momentum and no dampening
    (a zero buffer: momentum * 0 + grad is the fresh buffer). Other optimizers keep no state until the unfreeze."""
    if optimizer.state.get(param):
        return
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    zeros = lambda: torch.zeros_like(param, memory_format=torch.preserve_format)  # noqa: E731
    if isinstance(optimizer, torch.optim.Adam):
        on_device = group["capturable"] or group["fused"]
        state = {"step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]),
                                     device=param.device if on_device else "cpu"),
                 "exp_avg": zeros(), "exp_avg_sq": zeros()}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
    elif isinstance(optimizer, torch.optim.SGD) and group["momentum"] != 0 and group["dampening"] == 0:
        state = {"momentum_buffer": zeros()}
    else:
        return
    optimizer.state[param] = state
