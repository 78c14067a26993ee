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
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_pre_hook
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
        return None

    return register_optimizer_step_pre_hook(hook)
