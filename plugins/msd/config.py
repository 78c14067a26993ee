"""Config of the `msd` plugin (names follow ALBEF's vocabulary: alpha, momentum, queue_size, temp)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from vlmdistill.config import PluginConfig, option
from vlmdistill.errors import ConfigError

#: bounds of the softmax temperature, as in ALBEF (`temp.clamp_(0.001, 0.5)`)
TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5


@dataclasses.dataclass
class MSDConfig(PluginConfig):
    """Momentum self-distillation: EMA-teacher soft targets, two key queues, and an effective contrastive
    batch enlarged by gradient accumulation."""

    alpha: float = option(0.4, "weight of the teacher's similarity distribution in the soft targets; "
                               "targets = alpha * softmax(teacher sims) + (1 - alpha) * one-hot", ge=0.0, le=1.0)
    alpha_warmup_steps: int = option(
        1000, "optimizer steps over which alpha rises linearly from 0 to `alpha` (ALBEF: the first epoch; "
              "set it to your steps per epoch); 0 = no warm-up", ge=0)
    momentum: float = option(0.995, "EMA teacher update, once per optimizer step: "
                                    "teacher = momentum * teacher + (1 - momentum) * student", ge=0.0, le=1.0)
    queue_size: int = option(
        65536, "K: past teacher embeddings kept per modality as extra keys (0 = none). Keep it a multiple of the "
               "macro-batch (all micro-batches of one optimizer step, over all processes) and below ~10-20% of "
               "the training pairs, so that a sample rarely meets its own stale copy", ge=0)
    temperature: Optional[float] = option(
        None, "None: the student's own `logit_scale` (tau = exp(-logit_scale)) when it has one; a number: a "
              "plugin-owned temperature with this initial value (ALBEF: 0.07). Either is clamped to "
              f"[{TEMPERATURE_MIN}, {TEMPERATURE_MAX}] after every optimizer step", ge=TEMPERATURE_MIN,
        le=TEMPERATURE_MAX)
    learnable_temperature: bool = option(True, "train the plugin-owned temperature (ignored when the model's "
                                               "logit_scale is used: its requires_grad decides)")
    micro_batch_size: Optional[int] = option(
        None, "rows per chunk of the no-grad teacher pass over the accumulation window, and the micro-batch size "
              "msd_step() splits a macro-batch into; None = each micro-batch as delivered (under the Trainer: "
              "per_device_train_batch_size)", ge=1)
    ema_buffers: Literal["copy", "ema"] = option(
        "copy", "floating-point buffers of the teacher (BatchNorm running statistics): copied from the student "
                "or averaged like the parameters; integer buffers are always copied")
    image_embeds_module: Optional[str] = option(
        None, "read image embeddings from this module's output through a forward hook (e.g. 'visual_projection') "
              "instead of the model's output; L2-normalised by the plugin")
    text_embeds_module: Optional[str] = option(
        None, "as image_embeds_module, for the text embeddings (e.g. 'text_projection')")

    def validate(self, where=None):
        super().validate(where)
        if (self.image_embeds_module is None) != (self.text_embeds_module is None):
            raise ConfigError(f"{where or 'MSDConfig'}: give both image_embeds_module and text_embeds_module, "
                              f"or neither (got {self.image_embeds_module!r} and {self.text_embeds_module!r})")
