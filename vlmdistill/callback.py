"""HF Trainer integration: a callback for the per-step work and logging, and an optional Trainer mixin.

`DistillationCallback` is all most plugins need:
* `on_step_end` runs `model.step_end()` once per optimizer step (not per micro-batch), skipping steps the
  optimizer did not take;
* `on_pre_optimizer_step` drops a step whose loss was non-finite when the wrapper has `on_nonfinite='skip'`;
* `on_log` adds each loss term as `distill/<name>` to the Trainer's logs and log history.

`DistillationTrainerMixin` (or the ready `DistillationTrainer`) is for plugins that must see a whole
gradient-accumulation window before its first micro-batch (momentum self-distillation computes the
teacher keys of all micro-batches first), for plugins that train in stages (each stage starts with a fresh
optimizer state and its own learning-rate schedule, warm-up included: `vlmdistill.stages`), it logs the
terms before every reporting callback, and under DeepSpeed it saves the wrapper's own gathered state (a plain
Trainer cannot: `DistillationCallback` refuses that combination).
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import Trainer, TrainerCallback

from .api import unwrap_parallel
from .errors import ConfigError
from .model import DistillationModel


def _find_wrapper(model: Any) -> DistillationModel | None:
    inner = unwrap_parallel(model) if model is not None else None
    return inner if isinstance(inner, DistillationModel) else None


def _zero3(args) -> bool:
    config = getattr(args, "hf_deepspeed_config", None)
    return bool(getattr(args, "deepspeed", None)) and config is not None and config.is_zero3()


class DistillationCallback(TrainerCallback):
    """Drives a `vlmdistill.wrap`-ped model inside `transformers.Trainer`."""

    #: set by DistillationTrainerMixin on the callbacks of its own Trainer
    in_distillation_trainer = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is None:
            raise TypeError("DistillationCallback needs the Trainer's model to come from vlmdistill.wrap(...)")
        if wrapper.on_nonfinite == "skip" and getattr(args, "deepspeed", None):
            raise ConfigError("on_nonfinite='skip' cannot drop a step under DeepSpeed (its engine owns the optimizer "
                              "step); use on_nonfinite='raise'")
        mixin = self.in_distillation_trainer
        if _zero3(args) and not mixin:
            raise ConfigError("under DeepSpeed ZeRO-3, train with vlmdistill.DistillationTrainer (or a Trainer with "
                              "DistillationTrainerMixin): a plain Trainer saves DeepSpeed's gathered state dict, whose "
                              "tied weights share memory (safetensors refuses them at the first checkpoint) and which "
                              "lacks the plugin state")
        boundaries = wrapper.plugin.stage_boundaries()
        if boundaries and not mixin:
            warnings.warn(f"plugin {wrapper.plugin.name!r} trains in stages (new stage after optimizer step(s) "
                          f"{list(boundaries)}), but a plain Trainer runs one optimizer state and one learning-rate "
                          "schedule across them; vlmdistill.DistillationTrainer (or DistillationTrainerMixin) starts "
                          "each stage with a fresh optimizer state and its own warm-up", RuntimeWarning, stacklevel=2)
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


class StageRestartCallback(TrainerCallback):
    """After the optimizer step that ends a training stage (`plugin.stage_boundaries()`), forget the optimizer
    state: the next stage starts as a fresh optimizer would. Runs after `DistillationCallback`, which ends the
    step; `DistillationTrainerMixin` installs it together with the per-stage schedule."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is not None and wrapper.plugin.stage_boundaries() and getattr(args, "deepspeed", None):
            raise ConfigError(f"plugin {wrapper.plugin.name!r} restarts the optimizer at each training stage, which "
                              "DeepSpeed's engine (the owner of the optimizer state) does not allow; use DDP or FSDP2, "
                              "or turn the plugin's per-stage restart off")
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        wrapper = _find_wrapper(model)
        if wrapper is not None and wrapper.stage_ended and optimizer is not None:
            from .stages import reset_optimizer_state

            reset_optimizer_state(optimizer)
        return control


class DistillationTrainerMixin:
    """Mix into a `transformers.Trainer` subclass: `class MyTrainer(DistillationTrainerMixin, Trainer)`.

    When the plugin trains in stages, each stage gets a fresh optimizer state and its own learning-rate schedule
    of `lr_scheduler_type` over the stage's steps, with `warmup_steps` at the start of every stage (a fraction
    below 1: of each stage's length)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for callback in self.callback_handler.callbacks:  # this Trainer's own callbacks, not the model's
            if isinstance(callback, DistillationCallback):
                callback.in_distillation_trainer = True
        self.add_callback(StageRestartCallback())  # last: after DistillationCallback has ended the step

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        wrapper = _find_wrapper(self.model)
        boundaries = wrapper.plugin.stage_boundaries() if wrapper is not None else ()
        if self.lr_scheduler is None and boundaries:
            from .stages import hf_schedule_factory, staged_scheduler

            factory = hf_schedule_factory(self.args.lr_scheduler_type, self.args.warmup_steps,
                                          self.args.lr_scheduler_kwargs)
            self.lr_scheduler = staged_scheduler(optimizer if optimizer is not None else self.optimizer, boundaries,
                                                 num_training_steps, factory)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

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
            on_host = wrapper.plugin.window_on_host
            windows = batch_samples if on_host else [self._prepare_inputs(b) for b in batch_samples]
            wrapper.plugin.on_accumulation_window(windows)
        return batch_samples, num_items_in_batch

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        wrapper = _find_wrapper(self.model)
        engine = getattr(self, "deepspeed", None) if getattr(self, "is_deepspeed_enabled", False) else None
        if wrapper is None or engine is None or not engine.zero_gather_16bit_weights_on_model_save():
            return super().save_model(output_dir, _internal_call)
        # DeepSpeed's gathered state dict (what the Trainer writes) keeps tied weights sharing memory, which
        # safetensors refuses, and skips the wrapper's state-dict hooks (plugin state, 0-dim parameters). The
        # wrapper's own state dict, gathered module by module, is what a checkpoint without DeepSpeed holds.
        from .distributed import full_state_dict

        self._save(output_dir or self.args.output_dir, state_dict=full_state_dict(wrapper))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

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
