"""Training in stages: a fresh optimizer state and learning-rate schedule for each stage.

A plugin that trains in stages (dcclip: feature distillation, then contrastive alignment) declares, through
`DistillationPlugin.stage_boundaries()`, the optimizer steps after which a new stage begins. Each stage then
trains as its own run would: Adam's moments and step counts start from zero, and the schedule (warm-up
included) starts again over the stage's own length. One optimizer and one decaying schedule across the switch
would instead start stage 2 at a fraction of the peak rate, with moments accumulated for another loss.

`DistillationTrainer` applies this by itself. A hand-written loop builds its schedule with `staged_lambda` and
calls `reset_optimizer_state(optimizer)` when `model.step_end()` returns True (or builds a new optimizer then).
The schedule is a pure function of the step count, so a checkpoint from either stage resumes exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

#: multiplier of the base learning rate at a step of one stage, given that stage's length
ScheduleFactory = Callable[[int], Callable[[int], float]]


def stage_spans(boundaries: Sequence[int], total_steps: int) -> list[tuple[int, int]]:
    """(first step, number of steps) of each stage in a run of `total_steps` optimizer steps."""
    starts = [0, *sorted({int(b) for b in boundaries if 0 < int(b) < total_steps})]
    return [(start, end - start) for start, end in zip(starts, [*starts[1:], total_steps])]


def staged_lambda(spans: Sequence[tuple[int, int]], factory: ScheduleFactory) -> Callable[[int], float]:
    """A `LambdaLR` multiplier over every stage: stage i follows `factory(length_i)` from its own step 0."""
    parts = [(start, factory(max(length, 1))) for start, length in spans]

    def multiplier(step: int) -> float:
        for start, schedule in reversed(parts):
            if step >= start:
                return schedule(step - start)
        return parts[0][1](step)

    return multiplier


def hf_schedule_factory(name: str, warmup_steps: float = 0, scheduler_kwargs: dict[str, Any] | None = None
                        ) -> ScheduleFactory:
    """The multiplier of a transformers schedule (`get_scheduler(name, ...)`) for a stage of a given length.
    `warmup_steps` below 1 is a fraction of the stage (as `TrainingArguments.warmup_steps`)."""
    import math

    from transformers import get_scheduler

    def factory(length: int) -> Callable[[int], float]:
        warmup = int(warmup_steps) if warmup_steps >= 1 else math.ceil(length * warmup_steps)
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = get_scheduler(name, optimizer=probe, num_warmup_steps=warmup, num_training_steps=length,
                                 scheduler_specific_kwargs=scheduler_kwargs or {})
        lambdas = getattr(schedule, "lr_lambdas", None)
        if not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR) or not lambdas:
            raise ConfigError(f"lr_scheduler_type={name!r} is not a function of the step, so it cannot restart at "
                              "each training stage; use linear, cosine, constant_with_warmup, ... or turn the "
                              "plugin's per-stage restart off")
        return lambdas[0]

    return factory


def staged_scheduler(optimizer: torch.optim.Optimizer, boundaries: Sequence[int], total_steps: int,
                     factory: ScheduleFactory) -> torch.optim.lr_scheduler.LambdaLR:
    """One `LambdaLR` whose schedule restarts at each stage boundary. Its saved state is the step count only
    (the multiplier is rebuilt from the configuration), so it resumes from a checkpoint of any stage."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, staged_lambda(stage_spans(boundaries, total_steps), factory))


def reset_optimizer_state(optimizer: Any) -> None:
    """Forget every parameter's optimizer state (Adam's moments and step counts): the next step is the first step
    of a fresh optimizer with the same hyperparameters. torch optimizers create state lazily at a parameter's
    first step with a gradient, so a cleared state *is* a fresh optimizer; parameters idle in the new stage keep
    none."""
    chain = [optimizer]  # accelerate's wrapper (or another) around the torch optimizer
    while getattr(chain[-1], "optimizer", None) is not None and len(chain) < 8:
        chain.append(chain[-1].optimizer)
    inner = chain[-1]
    if any(type(o).__module__.startswith("deepspeed") for o in chain) or not isinstance(inner, torch.optim.Optimizer):
        raise ConfigError(f"cannot restart the optimizer state of a {type(inner).__name__} (DeepSpeed's engine, or "
                          "another non-torch optimizer, owns it); turn the plugin's per-stage restart off")
    inner.state.clear()
