"""`ccd`: character-to-character distillation (Guan et al., ICCV 2023) as a vlmdistill plugin.

One micro-batch of unlabeled text images (`pixel_values`, optionally `ccd_seed`):

1. two views per image (regular: photometric; irregular: photometric + affine, `theta` known);
2. pseudo text masks by 2-means on the input's grey levels (polarity fixed), warped to the irregular view;
3. the student backbone runs on both views; its block outputs feed the segmentation head (2-class loss);
4. character slots = connected components of the regular view's text mask (pseudo masks, then the student's
   own prediction after `pseudo_mask_fraction` of training), warped to the irregular view;
5. character features = mask-weighted token averages, for the student and the EMA teacher (no gradients);
   DINO head on both, cross-view loss over characters present in both views.

The EMA teacher (backbone + head) and the centre are hidden plugin state; they move once per optimizer
step in `on_step_end`. The student passed to `wrap()` is the backbone and stays a plain backbone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from vlmdistill.errors import UnsupportedModelError
from vlmdistill.hooks import ActivationCapture
from vlmdistill.plugin import DistillationPlugin, DistillationResult
from vlmdistill.precision import full_precision
from vlmdistill.teachers import EMATeacher, module_device

from .backbones import BackboneSpec, describe_backbone, patch_tokens
from .config import CCDConfig
from .heads import DINOHead, SegmentationHead
from .losses import (TeacherCentre, cross_view_distillation_loss, segmentation_loss, teacher_entropy,
                     teacher_momentum)
from .masks import (character_slots, pool_characters, pseudo_text_masks, slice_token_weights, slot_token_weights,
                    warp_masks)
from .views import make_views, sample_seeds

#: sub-folder of `save_pretrained` holding the EMA teacher backbone, the encoder to fine-tune downstream
TEACHER_ENCODER_DIR = "ccd_teacher_encoder"
EXPORT_NOTE_NAME = "ccd_export.json"


class CCDPlugin(DistillationPlugin):
    name = "ccd"
    description = "CCD: label-free text-image ViT pretraining, DINO on segmented characters paired across two views"
    config_class = CCDConfig
    teacher_policy = "none"
    extra_inputs = ("ccd_seed",)
    demo = "vlmdistill.eval.experiments.ccd:main"
    recipe_builders = ("vlmdistill.plugins.ccd.recipes", "vlmdistill.eval.experiments.ccd_recipes")

    def __init__(self, config: CCDConfig, **runtime: Any) -> None:
        super().__init__(config, **runtime)
        self.spec: BackboneSpec | None = None
        self._ema_backbone: EMATeacher | None = None
        self._ema_head: EMATeacher | None = None
        self._centre: TeacherCentre | None = None
        self._student_capture: ActivationCapture | None = None
        self._teacher_capture: ActivationCapture | None = None
        self._trainer_steps: int | None = None  # the Trainer's max_steps, when config.total_steps is None

    # ------------------------------------------------------------------ wrap
    def check_compatibility(self, student: nn.Module) -> None:
        cfg = self.config
        spec = describe_backbone(student)
        too_deep = [b for b in cfg.seg_blocks if b > spec.depth]
        if too_deep:
            raise UnsupportedModelError(f"seg_blocks {cfg.seg_blocks}: the student has only {spec.depth} blocks "
                                        f"(blocks {too_deep} do not exist)")
        self.spec = spec

    def setup(self, student: nn.Module) -> None:
        cfg, spec = self.config, self.spec
        device = module_device(student)
        # Heads stay in fp32 whatever the backbone dtype: 65k-way softmaxes at τ=0.04 need the range.
        self.seg_head = SegmentationHead(spec.width, len(cfg.seg_blocks), cfg.seg_hidden_channels,
                                         cfg.seg_map_channels, cfg.seg_groups).to(device)
        self.student_head = DINOHead(spec.width, cfg.out_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                                     cfg.norm_last_layer).to(device)
        self._ema_backbone = self.ema_teacher(student)
        self._ema_head = self.ema_teacher(self.student_head)
        self.set_teacher(self._ema_backbone.module)
        self._centre = TeacherCentre(cfg.out_dim, device)

    def attach(self, student: nn.Module, hooks) -> None:
        spec = self.spec
        block_paths = [spec.block_path(b) for b in self.config.seg_blocks]
        self._student_capture = ActivationCapture(student, [spec.final_norm, *block_paths], hooks, role="student")
        self._teacher_capture = ActivationCapture(self.teacher, [spec.final_norm], hooks, role="teacher")

    # ----------------------------------------------------------------- forward
    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        # No labels, so the Trainer divides by the accumulation steps itself: every term is a per-micro-batch
        # mean over images, and `num_items_in_batch` is not used.
        cfg, spec = self.config, self.spec
        key = self._image_key(inputs)
        pixels = inputs[key]
        b, _, h, w = pixels.shape
        grid = spec.grid((h, w))
        self._centre.to(module_device(self.student_head))  # unregistered: `.to()` on the wrapper does not move it
        step = int(self.global_step)
        pseudo_phase = self._before(cfg.pseudo_mask_fraction)

        with torch.no_grad():
            images = self._to_unit_range(pixels)
            views = make_views(images, sample_seeds(pixels, extras.get("ccd_seed"), step, cfg.seed), cfg.views)
            pseudo = pseudo_text_masks(images, cfg.kmeans_iterations)
            pseudo_irregular = warp_masks(pseudo, views.theta, cfg.warp_threshold)
            view_pixels = self._normalise(torch.cat([views.regular, views.irregular])).to(pixels.dtype)
        view_inputs = {**inputs, key: view_pixels}

        with self._student_capture.record() as feats:
            output = student(**view_inputs)
        tokens = patch_tokens(feats[spec.final_norm], grid).float()
        block_tokens = [patch_tokens(feats[spec.block_path(i)], grid).float() for i in cfg.seg_blocks]
        with full_precision(pixels.device):  # the heads stay fp32 under bf16 autocast (see setup)
            seg_logits = self.seg_head(block_tokens, grid, (h, w))
        seg = segmentation_loss(seg_logits, torch.cat([pseudo, pseudo_irregular]))

        with torch.no_grad():
            if cfg.instances == "slices":
                # the sequence-level baseline: strip k of one view is paired with strip k of the other
                weights_reg, present_reg = slice_token_weights(b, grid, cfg.slices, pixels.device)
                weights_irr, present_irr = weights_reg, present_reg
            else:
                text = pseudo if pseudo_phase else seg_logits[:b].argmax(1).bool()
                slots = character_slots(text, cfg.max_characters, cfg.min_character_pixels)
                weights_reg, present_reg = slot_token_weights(slots, grid)
                weights_irr, present_irr = slot_token_weights(warp_masks(slots, views.theta, cfg.warp_threshold),
                                                              grid)
            paired = present_reg & present_irr  # [B, K]: the character is visible in both views
            sample_index = paired.nonzero()[:, 0]

        with self.teacher_context() as teacher, self._teacher_capture.record() as teacher_feats:
            teacher(**view_inputs)
            teacher_tokens = patch_tokens(teacher_feats[spec.final_norm], grid).float()
            with full_precision(pixels.device):  # pooling and heads in fp32 under bf16 autocast too
                t_reg = pool_characters(teacher_tokens[:b], weights_reg)[paired]
                t_irr = pool_characters(teacher_tokens[b:], weights_irr)[paired]
                teacher_logits = self._ema_head.module(torch.cat([t_reg, t_irr]))
        if self.training:
            self._centre.observe(teacher_logits)

        n = t_reg.shape[0]
        if n:
            with full_precision(pixels.device):
                s_reg = pool_characters(tokens[:b], weights_reg)[paired]
                s_irr = pool_characters(tokens[b:], weights_irr)[paired]
                student_logits = self.student_head(torch.cat([s_reg, s_irr]))
            distill = cross_view_distillation_loss(
                student_logits[:n], student_logits[n:], teacher_logits[:n], teacher_logits[n:], self._centre.value,
                sample_index, b, student_temperature=cfg.student_temperature,
                teacher_temperature=cfg.teacher_temperature)
        else:
            # Keep the head in the graph with zero gradient: DDP and accumulation then see the same parameters.
            with full_precision(pixels.device):
                distill = self.student_head(tokens.new_zeros(1, spec.width)).sum() * 0.0
        loss = cfg.seg_weight * seg + cfg.distill_weight * distill
        terms = {"seg": seg.detach(), "distill": distill.detach()}
        metrics = {"paired_characters": torch.tensor(n / b, device=seg.device),
                   "teacher_entropy": teacher_entropy(teacher_logits.detach(), self._centre.value, sample_index, b,
                                                      cfg.teacher_temperature)}
        return DistillationResult(output=output, loss=loss, loss_terms=terms, metrics=metrics)

    def _image_key(self, inputs: dict[str, Any]) -> str:
        for key in (self.spec.input_name, "pixel_values", "x"):
            if isinstance(inputs.get(key), torch.Tensor) and inputs[key].dim() == 4:
                return key
        raise UnsupportedModelError(f"ccd needs a [B, C, H, W] image batch under {self.spec.input_name!r}; "
                                    f"got keys {sorted(inputs)}")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = like.shape[1]
        mean = torch.tensor(self.config.image_mean[:c], device=like.device, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(self.config.image_std[:c], device=like.device, dtype=torch.float32).view(1, c, 1, 1)
        return mean, std

    def _to_unit_range(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(pixels)
        return (pixels.float() * std + mean).clamp(0, 1)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return (images - mean) / std

    # ------------------------------------------------------------- schedules
    def on_train_begin(self, max_steps: int) -> None:
        self._trainer_steps = int(max_steps)

    def total_steps(self) -> int:
        """Optimizer steps of the run: `config.total_steps`, else the Trainer's max_steps."""
        total = self.config.total_steps or self._trainer_steps
        if total is None:
            raise RuntimeError(
                "ccd: the schedules (pseudo-mask phase, prototype freeze, EMA momentum) are fractions of training, and "
                "the run's length is unknown. Train under transformers.Trainer with vlmdistill.DistillationCallback "
                "(it passes max_steps), or set total_steps=<optimizer steps of the run> in the config")
        return total

    def _before(self, fraction: float) -> bool:
        """Is the current optimizer step within the first `fraction` of training? (An evaluation forward before the
        run's length is known counts as the start.)"""
        if not self.training and not (self.config.total_steps or self._trainer_steps):
            return True
        return int(self.global_step) < fraction * self.total_steps()

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The prototype layer during the first `freeze_last_layer_fraction` of training. Read right before each
        optimizer step, when `global_step` counts the steps taken before it."""
        known = self.config.total_steps or self._trainer_steps
        if self.spec is None or not known or not self._before(self.config.freeze_last_layer_fraction):
            return []
        head = self.student_head
        return [head.last_direction, head.last_gain]

    # ---------------------------------------------------------------- per step
    def on_step_end(self) -> None:
        if self._ema_backbone is None:
            return
        cfg = self.config
        momentum = teacher_momentum(int(self.global_step) - 1, self.total_steps(), cfg.teacher_momentum)
        self._ema_backbone.update(momentum)
        self._ema_head.update(momentum)
        self._centre.update(cfg.center_momentum)

    def on_step_skipped(self) -> None:
        if self._centre is not None:
            self._centre.discard()

    # ------------------------------------------------------------- persistence
    def hidden_state(self) -> dict[str, torch.Tensor]:
        if self._ema_backbone is None:
            return {}
        state = {f"teacher.{k}": v for k, v in self._ema_backbone.module.state_dict().items()}
        state.update({f"teacher_head.{k}": v for k, v in self._ema_head.module.state_dict().items()})
        state["center"] = self._centre.value
        return state

    def hidden_modules(self) -> dict[str, nn.Module]:
        if self._ema_backbone is None:
            return {}
        return {"teacher.": self._ema_backbone.module, "teacher_head.": self._ema_head.module}

    def load_hidden_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.hidden_state())
        if set(state) != expected:
            raise ValueError(f"ccd hidden state: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self._ema_backbone.load_state_dict(part("teacher."))
        self._ema_head.load_state_dict(part("teacher_head."))
        self._centre.value.copy_(state["center"])

    def save_student(self, student: nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> None:
        """The student backbone in its native format at the top level, plus the EMA teacher backbone (the
        encoder CCD recommends for downstream fine-tuning) in `ccd_teacher_encoder/` and a note
        `ccd_export.json` saying which is which."""
        from vlmdistill.distributed import full_state_dict, is_main_process
        from vlmdistill.io import save_student

        super().save_student(student, directory, state_dict=state_dict)
        if self.teacher is not None:
            teacher_state = full_state_dict(self.teacher)  # every rank: a sharded teacher is gathered
            save_student(self.teacher, os.path.join(directory, TEACHER_ENCODER_DIR), state_dict=teacher_state)
        if not is_main_process():
            return
        with open(os.path.join(directory, EXPORT_NOTE_NAME), "w") as fh:
            json.dump({"student_backbone": ".", "teacher_encoder": TEACHER_ENCODER_DIR,
                       "use_for_downstream": TEACHER_ENCODER_DIR,
                       "note": "CCD initialises recognisers from the EMA teacher encoder; the heads (segmentation, "
                               "DINO) are training-only and live in vlmdistill_plugin_state.safetensors"},
                      fh, indent=2)
            fh.write("\n")

    def extra_repr(self) -> str:
        kind = self.spec.kind if self.spec is not None else None
        return f"name={self.name!r}, backbone={kind}, out_dim={self.config.out_dim}"

