"""Parameters a plugin holds still for a while get no optimizer update at all.

A zero gradient is not a freeze: AdamW still steps such a parameter (weight decay) and advances its moments, so at
the unfreeze it takes updates several times larger than a fresh Adam would. The only freeze an optimizer honours is
`param.grad = None` when it steps. The gradient is still computed (the parameter stays in the graph, so DDP's
reduction and gradient accumulation see the same parameters every step) and is dropped right before the step,
after DDP has reduced it and after gradient clipping has read it — where the reference implementations of DINO and
CCD drop it (`cancel_gradients_last_layer`).

The drop runs in a global optimizer step pre-hook, so it holds in every loop (HF Trainer, accelerate, a hand-written
loop, a GradScaler's step) without the user calling anything. DeepSpeed's engine steps its own flattened gradient
partitions, which this cannot reach.

A frozen parameter still gets an optimizer state: for Adam and AdamW (the Trainer's default) and SGD with momentum
the hook writes one the first update after the freeze treats exactly as a fresh start (`_give_fresh_state`), so
every trainable parameter has a state to checkpoint. Without it a distributed
checkpoint saved during the freeze cannot be loaded strictly (torch.distributed.checkpoint's `set_state_dict`
and accelerate's FSDP2 resume refuse a trainable parameter with no saved optimizer state).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle


def drop_frozen_gradients(wrapper: Any) -> RemovableHandle:
    """Install the hook for `wrapper` (a `DistillationModel`): before any optimizer step, `.grad = None` for the
    parameters its plugin's `frozen_parameters()` names that the stepping optimizer holds. Remove it on unwrap."""
    ref = weakref.ref(wrapper)

    def hook(optimizer, args, kwargs):
        owner = ref()
        if owner is None:
            return None
        frozen = owner.plugin.frozen_parameters()
        if not frozen:
            return None
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for param in frozen:
            if id(param) in held:
                param.grad = None
                _give_fresh_state(optimizer, param)
        return None

    return register_optimizer_step_pre_hook(hook)


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
