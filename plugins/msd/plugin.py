"""`msd`: momentum self-distillation for contrastive dual encoders (CLIP, SigLIP, VisionTextDualEncoder,
open_clip).

Per optimizer step (one accumulation window of M micro-batches, B rows over all processes):
1. `on_accumulation_window`: teacher keys of all B rows (EMA teacher, no grad, chunked, all-gathered);
2. `forward` per micro-batch: student embeddings against the B keys + the queue, soft targets from the
   teacher rows of the same samples; returns a loss that the accumulation sums to the macro-batch mean;
3. `on_step_end` after the optimizer step: one fused EMA update, one enqueue of the B keys, temperature clamp.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from vlmdistill.distributed import gathered_parameters
from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hooks import get_submodule
from vlmdistill.plugin import DistillationPlugin, DistillationResult
from vlmdistill.precision import full_precision
from vlmdistill.teachers import EMATeacher, module_device

from .config import TEMPERATURE_MAX, TEMPERATURE_MIN, MSDConfig
from .embeddings import EmbeddingReader, embedding_width, model_logit_scale
from .losses import momentum_contrastive_rows
from .queue import KeyQueues
from .window import AccumulationWindow

NO_WINDOW_HELP = (
    "Under transformers.Trainer with gradient_accumulation_steps > 1 use vlmdistill.DistillationTrainer (or mix "
    "vlmdistill.DistillationTrainerMixin into your Trainer class); in a hand-written loop use "
    "vlmdistill.plugins.msd.msd_step(model, optimizer, macro_batch, micro_batch_size), or call "
    "model.plugin.on_accumulation_window(micro_batches) before the first micro-batch and model.step_end() after "
    "optimizer.step()")


class MSDPlugin(DistillationPlugin):
    name = "msd"
    description = ("Momentum self-distillation: EMA-teacher soft targets, image/text key queues, contrastive batch "
                   "enlarged by gradient accumulation")
    config_class = MSDConfig
    teacher_policy = "none"
    demo = "vlmdistill.eval.experiments.msd:main"
    recipe_builders = "vlmdistill.eval.experiments.msd_recipes"
    window_on_host = True

    def __init__(self, config: MSDConfig, **runtime: Any) -> None:
        super().__init__(config, **runtime)
        self.queues = KeyQueues(config.queue_size)
        if config.temperature is not None:
            # ALBEF learns tau itself (not its log) and clamps it to [0.001, 0.5].
            self.temp = nn.Parameter(torch.tensor(float(config.temperature)),
                                     requires_grad=config.learnable_temperature)
        self._ema: EMATeacher | None = None
        self._window: AccumulationWindow | None = None
        self._warned_queue_multiple = False
        self._student_reader: EmbeddingReader | None = None
        self._teacher_reader: EmbeddingReader | None = None

    # ------------------------------------------------------------------ wrap
    def check_compatibility(self, student: nn.Module) -> None:
        cfg = self.config
        if cfg.image_embeds_module is not None:
            for path in (cfg.image_embeds_module, cfg.text_embeds_module):
                get_submodule(student, path, role="student")
        elif not any(hasattr(student, m) for m in ("get_image_features", "encode_image")):
            raise UnsupportedModelError(
                f"msd needs a dual encoder (CLIP, SigLIP, VisionTextDualEncoder, open_clip); "
                f"{type(student).__name__} has neither get_image_features nor encode_image. Set "
                "image_embeds_module / text_embeds_module to read embeddings through hooks")
        if cfg.temperature is None and model_logit_scale(student) is None:
            raise UnsupportedModelError(
                f"{type(student).__name__} has no logit_scale; set temperature (e.g. 0.07) for a plugin-owned one")

    def setup(self, student: nn.Module) -> None:
        cfg = self.config
        width = embedding_width(student, cfg.image_embeds_module)
        if width is not None and cfg.queue_size:
            reference = next(student.parameters())  # keys are fp32, or fp64 for a fp64 model
            dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
            self.queues.allocate(width, dtype, reference.device)
        self._ema = self.ema_teacher(student, buffers=cfg.ema_buffers)
        self.set_teacher(self._ema.module)

    def attach(self, student: nn.Module, hooks) -> None:
        cfg = self.config
        self._student_reader = EmbeddingReader(student, hooks, cfg.image_embeds_module, cfg.text_embeds_module,
                                               role="student")
        self._teacher_reader = EmbeddingReader(self.teacher, hooks, cfg.image_embeds_module, cfg.text_embeds_module,
                                               role="teacher")

    # ------------------------------------------------------------ schedules
    def current_alpha(self) -> float:
        """alpha · min(1, step / alpha_warmup_steps): 0 at the first step, as in ALBEF."""
        cfg = self.config
        if cfg.alpha_warmup_steps == 0:
            return cfg.alpha
        return cfg.alpha * min(1.0, int(self.global_step) / cfg.alpha_warmup_steps)

    def logit_scale(self) -> torch.Tensor:
        """1 / temperature, with gradient to whichever parameter holds the temperature."""
        if self.config.temperature is not None:
            return 1.0 / self.temp
        return model_logit_scale(self.student).exp()

    @torch.no_grad()
    def _clamp_temperature(self) -> None:
        # Outside a forward: an FSDP2 shard (clamped elementwise as it is) or a ZeRO-3 partition (gathered)
        if self.config.temperature is not None:
            param, low, high = self.temp, TEMPERATURE_MIN, TEMPERATURE_MAX
        else:
            param = model_logit_scale(self.student)
            low, high = math.log(1 / TEMPERATURE_MAX), math.log(1 / TEMPERATURE_MIN)
        with gathered_parameters([param], modify=True):
            param.clamp_(low, high)

    # --------------------------------------------------------------- teacher
    def _teacher_keys(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.teacher_context() as teacher:
            device = module_device(teacher)
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            _, image, text = self._teacher_reader.run(teacher, batch)
        return image, text

    def _build_window(self, batches, *, gather: bool, implicit: bool) -> AccumulationWindow:
        window = AccumulationWindow.build(batches, self._teacher_keys, self.config.micro_batch_size, gather=gather,
                                          implicit=implicit)
        if gather:
            self._check_queue_multiple(window.total)
        return window

    def _check_queue_multiple(self, macro_batch: int) -> None:
        size = self.config.queue_size
        if size and size % macro_batch and not self._warned_queue_multiple:
            # Still correct (the queue wraps key by key), but the last window of an epoch or a ragged batch
            # leaves the queue holding parts of macro-batches; ALBEF requires a multiple.
            warnings.warn(f"msd: queue_size {size} is not a multiple of the macro-batch ({macro_batch} rows over all "
                          "processes); use a multiple (and dataloader_drop_last=True)", stacklevel=3)
            self._warned_queue_multiple = True

    # ------------------------------------------------------------- windows
    def on_accumulation_window(self, batches: list[dict[str, Any]]) -> None:
        # Before the Trainer's model.train(): the window is a training collective, so the EMA copies are made
        # equal across ranks here, not only in the first training-mode teacher_context
        self.prepare_ema_teachers(collective=True)
        batches = [{k: v for k, v in b.items() if k not in ("num_items_in_batch",)} for b in batches]
        self._window = self._build_window(batches, gather=True, implicit=False)

    def _window_for(self, inputs: dict[str, Any]) -> AccumulationWindow:
        window = self._window
        if window is not None and not window.exhausted:
            return window
        if window is not None:
            if window.implicit:
                raise RuntimeError("msd: a second micro-batch arrived before the optimizer step, and no accumulation "
                                   "window was announced, so its teacher keys and the macro-batch are unknown. "
                                   + NO_WINDOW_HELP)
            raise RuntimeError(f"msd: all {window.micro_batches} micro-batches announced for this optimizer step "
                               "were already used; call model.step_end() after optimizer.step(). " + NO_WINDOW_HELP)
        # No window announced: a lone training forward is a window of one micro-batch (plain loops, GA = 1).
        self._window = self._build_window([inputs], gather=True, implicit=True)
        return self._window

    # --------------------------------------------------------------- forward
    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        if self.training:
            window = self._window_for(inputs)
            index = window.claim(inputs)
        else:
            # Evaluation: this batch is its own macro-batch; no state changes, no collectives.
            window = self._build_window([inputs], gather=False, implicit=True)
            index = window.claim(inputs)
        output, image, text = self._student_reader.run(student, inputs)
        image_keys = window.image_keys.to(image.device, image.dtype)
        text_keys = window.text_keys.to(image.device, image.dtype)
        queued_image, queued_text = self.queues.keys()
        if queued_image is not None:
            image_keys = torch.cat([image_keys, queued_image.T.to(image.device, image.dtype)])
            text_keys = torch.cat([text_keys, queued_text.T.to(image.device, image.dtype)])
        offset = window.offsets[index]
        positives = torch.arange(offset, offset + image.shape[0], device=image.device)
        scale = self.logit_scale().to(image.device, image.dtype)
        with full_precision(image.device):  # similarities over B + K keys in fp32, also under bf16 autocast
            i2t, t2i = momentum_contrastive_rows(image, text, image_keys, text_keys, positives,
                                                 alpha=self.current_alpha(), logit_scale=scale)
        rows = 0.5 * (i2t + t2i)
        loss = rows.sum() * self._row_weight(window, num_items_in_batch)
        terms = {"i2t": i2t.mean().detach(), "t2i": t2i.mean().detach()}
        return DistillationResult(output=output, loss=loss, loss_terms=terms)

    @staticmethod
    def _row_weight(window: AccumulationWindow, num_items_in_batch: Any) -> float:
        """Weight of each row's loss so that the window sums to the mean over its B rows.

        Without `num_items_in_batch` (batches without labels) the Trainer divides each micro-batch loss by
        the window's M and DDP averages over W processes: M·W/B undoes both. With it, the Trainer
        multiplies by W instead of dividing by M: 1/B."""
        if num_items_in_batch is not None:
            return 1.0 / window.total
        return window.micro_batches * window.world_size / window.total

    # -------------------------------------------------------------- per step
    def on_step_end(self) -> None:
        self._ema.update(self.config.momentum)
        window, self._window = self._window, None
        if window is not None and window.started:
            # After the loss: the keys of this step never meet themselves in the queue.
            self.queues.enqueue(window.image_keys, window.text_keys)
        self._clamp_temperature()

    def on_step_skipped(self) -> None:
        # The optimizer did not step: no EMA move, no enqueue (a skipped step's keys may be NaN); the next step
        # starts a window of its own.
        self._window = None

    # ----------------------------------------------------------- persistence
    def hidden_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v for k, v in self._ema.state_dict().items()} if self._ema is not None else {}
        state.update(self.queues.state())
        return state

    def hidden_modules(self) -> dict[str, nn.Module]:
        return {"teacher.": self._ema.module} if self._ema is not None else {}

    def load_hidden_state(self, state: dict[str, torch.Tensor]) -> None:
        teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        self._ema.load_state_dict(teacher)
        self.queues.load_state(state)
        self._window = None

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"alpha={cfg.alpha}, momentum={cfg.momentum}, queue_size={cfg.queue_size}, "
                f"temperature={'model logit_scale' if cfg.temperature is None else 'plugin'}")
