"""HF Trainer integration: a callback for the per-step work and logging, and an optional Trainer mixin.

`DistillationCallback` is all most plugins need:
* `on_step_end` runs `model.step_end()` once per optimizer step (not per micro-batch), skipping steps the
  optimizer did not take;
* `on_pre_optimizer_step` drops a step whose loss was non-finite when the wrapper has `on_nonfinite='skip'`;
* `on_log` adds each loss term as `distill/<name>` to the Trainer's logs and log history.

`DistillationTrainerMixin` (or the ready `DistillationTrainer`) is for plugins that must see a whole
gradient-accumulation window before its first micro-batch (momentum self-distillation computes the
teacher keys of all micro-batches first), and it logs the terms before every reporting callback.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from .api import unwrap_parallel
from .model import DistillationModel


def _find_wrapper(model: Any) -> DistillationModel | None:
    inner = unwrap_parallel(model) if model is not None else None
    return inner if isinstance(inner, DistillationModel) else None


class DistillationCallback(TrainerCallback):
    """Drives a `vlmdistill.wrap`-ped model inside `transformers.Trainer`."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is None:
            raise TypeError("DistillationCallback needs the Trainer's model to come from vlmdistill.wrap(...)")
        if wrapper.on_nonfinite == "skip" and getattr(args, "deepspeed", None):
            from .errors import ConfigError

            raise ConfigError("on_nonfinite='skip' cannot drop a step under DeepSpeed (its engine owns the optimizer "
                              "step); use on_nonfinite='raise'")
        if state.max_steps and state.max_steps > 0:
            wrapper.plugin.on_train_begin(int(state.max_steps))
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is not None:
            wrapper.pre_optimizer_step(optimizer)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is not None:
            # accelerate's optimizer reports a step the mixed-precision scaler skipped (overflow): no EMA/schedule then
            wrapper.step_end(skipped=bool(getattr(optimizer, "step_was_skipped", False)))
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is None or logs is None or "loss" not in logs:
            return control
        # reduced over ranks like the Trainer's own loss: num_items_in_batch counts all ranks unless told otherwise
        terms = wrapper.pop_logged_terms(count_is_global=getattr(args, "average_tokens_across_devices", True))
        logs.update(terms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(terms)
        return control


class DistillationTrainerMixin:
    """Mix into a `transformers.Trainer` subclass: `class MyTrainer(DistillationTrainerMixin, Trainer)`."""

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        wrapper = _find_wrapper(self.model)
        if wrapper is not None and wrapper.plugin.window_on_host and getattr(loader, "device", None) is not None:
            # accelerate's loader would move every micro-batch of the window to the device when the Trainer
            # prefetches it; left on the host, each moves in `training_step` (`_prepare_inputs`) and is freed after
            # its backward, so the device holds one micro-batch at a time.
            loader.device = None
        return loader

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        wrapper = _find_wrapper(self.model)
        if wrapper is not None and batch_samples:
            windows = batch_samples if wrapper.plugin.window_on_host else [self._prepare_inputs(b) for b in batch_samples]
            wrapper.plugin.on_accumulation_window(windows)
        return batch_samples, num_items_in_batch

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        wrapper = _find_wrapper(self.model)
        if wrapper is not None and "loss" in logs:
            logs.update(wrapper.pop_logged_terms(
                count_is_global=getattr(self.args, "average_tokens_across_devices", True)))
        super().log(logs, *args, **kwargs)


class DistillationTrainer(DistillationTrainerMixin, Trainer):
    """`transformers.Trainer` with `DistillationTrainerMixin` and `DistillationCallback` built in."""

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, DistillationCallback) or c is DistillationCallback for c in callbacks):
            callbacks.append(DistillationCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
