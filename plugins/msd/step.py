"""`msd_step`: one optimizer step of momentum self-distillation in a hand-written training loop."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch

from vlmdistill.api import unwrap_parallel, step_end
from vlmdistill.teachers import module_device, to_device

from .window import batch_size_of, split_batch


def msd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, macro_batch: Mapping[str, Any],
             micro_batch_size: int | None = None, *, scheduler: Any = None, max_grad_norm: float | None = None,
             backward: Callable[[torch.Tensor], None] | None = None) -> float:
    """Split `macro_batch` into micro-batches of `micro_batch_size` rows (default: the config's
    `micro_batch_size`, else the whole batch), compute the teacher keys of all of them, forward/backward
    each against all keys + the queue, then take one optimizer step and run the per-step work (one EMA
    update, one enqueue). Peak activation memory is that of one micro-batch. `macro_batch` may stay on the host
    (pinned memory helps): each micro-batch moves to the model's device for its own forward, so the device holds
    one micro-batch of inputs at a time plus the window's teacher keys.

    `model` is the `vlmdistill.wrap(..., plugin="msd")` wrapper, possibly inside DDP (gradients are
    synchronised on the last micro-batch only). `backward` replaces `loss.backward()`, e.g.
    `accelerator.backward`. Returns the macro-batch loss.
    """
    wrapper = unwrap_parallel(model)
    plugin = getattr(wrapper, "plugin", None)
    if plugin is None or plugin.name != "msd":
        raise TypeError("msd_step needs a model returned by vlmdistill.wrap(model, plugin='msd')")
    if not model.training:
        raise RuntimeError("msd_step: the model is in eval mode; call model.train() first")
    size = micro_batch_size or plugin.config.micro_batch_size or batch_size_of(macro_batch)
    micro_batches = split_batch(macro_batch, size)
    plugin.on_accumulation_window(micro_batches)
    device = module_device(wrapper.student)
    total = 0.0
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        no_sync = getattr(model, "no_sync", None)
        context = no_sync() if callable(no_sync) and not last else contextlib.nullcontext()
        with context:
            loss = model(**to_device(micro, device)).loss / len(micro_batches)
            backward(loss) if backward is not None else loss.backward()
        total += float(loss.detach())
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_end(model)
    return total
