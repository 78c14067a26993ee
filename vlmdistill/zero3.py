"""DeepSpeed ZeRO-3 for distillation: the config the Trainer gets, and a partitioned teacher.

The HF Trainer (or accelerate) partitions the wrapper `wrap()` returns — the student and the plugin's trainable
parts. The teacher is not part of it; `partition_teacher` partitions it the same way (ZeRO-3 without an optimizer),
so each rank stores 1/world of it and DeepSpeed's hooks gather each module's weights for its forward. EMA teachers
(msd, ccd) stay replicated: they are updated from the student's gathered parameters after every optimizer step.
Needs `pip install vlmdistill[deepspeed]`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .errors import ConfigError


def zero3_config(*, offload: bool = False, **overrides: Any) -> dict[str, Any]:
    """A ZeRO-3 config for `TrainingArguments(deepspeed=...)`: sizes and precision left to the Trainer ("auto"),
    16-bit weights gathered for `save_model`, parameters and optimizer state in CPU memory with `offload`.
    `overrides` are merged in (nested dicts key by key)."""
    zero: dict[str, Any] = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              # the Trainer's optimizer (AdamW) or any torch optimizer passed in, partitioned by ZeRO
              "zero_allow_untested_optimizer": True, "zero_optimization": zero}
    return _merged(config, overrides)


def cpu_accelerator_state() -> dict[str, Any]:
    """The `accelerator_config` for `TrainingArguments(deepspeed=...)` on a machine without GPUs (DeepSpeed's CPU
    accelerator, gloo), launched with `torchrun` / `accelerate launch`. Call it on every rank before each
    `TrainingArguments`: `TrainingArguments(..., deepspeed=zero3_config(), accelerator_config=cpu_accelerator_state())`.

    Without it the Trainer and DeepSpeed disagree on the world size before training starts ("train_batch_size
    is not equal to micro_batch_per_gpu * gradient_acc_step * world_size"): without a GPU, accelerate's
    `PartialState` picks no communication backend, so it counts the DeepSpeed run as one process while DeepSpeed's
    process group has them all, and the Trainer fills the batch sizes from accelerate's count. Here the process
    group is created with gloo and accelerate's state is built on it (DeepSpeed, every process counted); the
    Trainer then uses that state (`use_configured_state`). Each call starts a fresh accelerator state on the same
    process group, as `TrainingArguments` does itself. In one process (no launcher) there is nothing to fix: `{}`."""
    import os

    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from .extras import require

    if "LOCAL_RANK" not in os.environ:
        return {}
    if not dist.is_initialized():
        require("deepspeed", "ZeRO-3").init_distributed(dist_backend="gloo")
    AcceleratorState._reset_state(reset_partial_state=False)
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState, as TrainingArguments sets it
    try:
        state = PartialState(backend=dist.get_backend())
    finally:
        if flag is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = flag
    if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes != dist.get_world_size():
        raise ConfigError(f"accelerate's process state was created before (as {state.distributed_type.value} with "
                          f"{state.num_processes} of {dist.get_world_size()} processes); call "
                          "cpu_accelerator_state() before anything creates an Accelerator or PartialState")
    return {"use_configured_state": True}


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def partition_teacher(wrapped: nn.Module, *, offload: bool = False, config: dict[str, Any] | None = None):
    """Partition the frozen teacher of a `vlmdistill.wrap` model with ZeRO-3 (call on every rank, after the
    process group exists, e.g. after creating `TrainingArguments`). Returns the DeepSpeed engine, which the
    plugin also keeps. `offload`: the partitions live in CPU memory."""
    import deepspeed

    from .api import unwrap_parallel

    plugin = unwrap_parallel(wrapped).plugin
    if plugin.teacher is None:
        raise ConfigError(f"plugin {plugin.name!r} has no teacher to partition")
    if plugin.teacher_policy == "none":
        raise ConfigError(f"plugin {plugin.name!r} updates its EMA teacher from the student after every step; under "
                          "ZeRO-3 keep it replicated (its updates gather the student's partitions)")
    if plugin.teacher_is_student_base:
        raise ConfigError("teacher='base' is the student itself: it is partitioned with the student")
    zero: dict[str, Any] = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    settings = _merged({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}, config or {})
    engine, *_ = deepspeed.initialize(model=plugin.teacher, config=settings)
    plugin.set_teacher(plugin.teacher, keep_alive=engine)  # DeepSpeed's hooks live as long as the engine
    return engine
