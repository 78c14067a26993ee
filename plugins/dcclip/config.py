"""Config of the `dcclip` plugin.

Defaults marked [inferred] in the README are choices the paper (arXiv 2404.11249) does not state;
each is an option here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from vlmdistill.config import PluginConfig, option
from vlmdistill.errors import ConfigError

LN_INV_007 = math.log(1 / 0.07)


@dataclasses.dataclass
class TowerTaps(PluginConfig):
    """Overrides of where features are read from one model (student or teacher). Leave empty for the
    supported families (HF CLIP / AltCLIP / ChineseCLIP / SigLIP, open_clip ViT / ResNet towers)."""

    image_module: Optional[str] = option(
        None, "module whose output holds the image tokens [B, N, D] or feature map [B, C, H, W]")
    image_prefix_tokens: Optional[int] = option(
        None, "leading non-patch tokens (class token, registers) to drop from image_module's output", ge=0)
    image_dim: Optional[int] = option(None, "width of image_module's output (channels for a map)", ge=1)
    text_module: Optional[str] = option(None, "module whose output holds the text token states [B, L, D]")
    text_dim: Optional[int] = option(None, "width of text_module's output", ge=1)


@dataclasses.dataclass
class DCCLIPConfig(PluginConfig):
    """DC-CLIP: stage 1 feature distillation per tower, stage 2 teacher-free contrastive alignment."""

    # ----------------------------------------------------------------- stages
    stage: Literal[1, 2] = option(1, "stage to start in: 1 = feature distillation, 2 = contrastive alignment")
    switch_at_step: Optional[int] = option(
        None, "switch from stage 1 to stage 2 after this many optimizer steps (None: no switch)", ge=1)
    switch_at_epoch: Optional[int] = option(
        None, "switch after this many epochs; needs steps_per_epoch (the switch runs in the per-step hook)", ge=1)
    steps_per_epoch: Optional[int] = option(None, "optimizer steps per epoch, for switch_at_epoch", ge=1)
    release_teacher_at_switch: bool = option(
        True, "drop the plugin's references to the teacher and the teacher-feature cache when stage 2 starts, so "
              "their memory can be freed")
    restart_optimizer_at_switch: bool = option(
        True, "stage 2 starts with a fresh optimizer state and its own learning-rate schedule and warm-up "
              "(DistillationTrainer and recipes do it; a hand-written loop does it when step_end() returns True)")

    # ---------------------------------------------------------------- stage 1
    image_weight: float = option(1.0, "lambda of the image-tower feature loss", ge=0.0)
    text_weight: float = option(1.0, "lambda_txt of the text-tower loss", ge=0.0)
    text_level: Literal["tokens", "pooled"] = option(
        "tokens", "'tokens': token states over non-padding tokens (needs the teacher's tokenizer); 'pooled': "
                  "the projected text embedding only (allowed across different tokenizers)")
    embedding_weight: float = option(
        0.0, "weight of the optional embedding-level term on both towers' projected embeddings", ge=0.0)
    feature_loss: Literal["smooth_l1", "mse", "cosine"] = option("smooth_l1", "distance for token / map features")
    smooth_l1_beta: float = option(1.0, "beta of SmoothL1 (the point where it turns from quadratic to linear)",
                                   gt=0.0)
    embedding_loss: Literal["cosine", "smooth_l1", "mse"] = option(
        "cosine", "distance for the embedding-level terms (and text_level='pooled')")
    adapter: Literal["conv", "linear"] = option(
        "conv", "1x1 adapter from student to teacher width: a 1x1 Conv2d on the image map or a Linear on tokens")
    spatial_align: Literal["interpolate", "pool"] = option(
        "interpolate", "'interpolate': the adapted student map is resized to the teacher grid; 'pool': the "
                       "teacher map is average-pooled to the student grid")
    interpolation: Literal["bilinear", "nearest", "bicubic"] = option(
        "bilinear", "mode for spatial_align='interpolate'")
    text_normalisation: Literal["per_sample", "per_token"] = option(
        "per_sample", "text token loss: mean over each sample's non-padding tokens, then over samples "
                      "('per_sample', exact under gradient accumulation and DDP) or one mean over all "
                      "non-padding tokens of the micro-batch ('per_token') [inferred]")
    teacher_feature_norm: Literal["none", "layernorm"] = option(
        "none", "normalise teacher token/map features (parameter-free LayerNorm over channels) before matching")
    resize_teacher_pixels: bool = option(
        True, "resize pixel_values to the teacher's input size when they differ (else pass teacher_pixel_values)")
    student_taps: TowerTaps = option(default_factory=TowerTaps, help="feature-tap overrides for the student")
    teacher_taps: TowerTaps = option(default_factory=TowerTaps, help="feature-tap overrides for the teacher")

    # ------------------------------------------------------ teacher-feature cache
    teacher_cache: Optional[str] = option(
        None, "directory of a teacher-feature cache (vlmdistill cache-teacher): stage 1 then looks teacher "
              "features up by (sample_key, augmentation_seed) and runs no teacher forward")
    cache_check_inputs: bool = option(
        True, "compare each batch's teacher inputs (token ids, pixel statistics) with those the cache was built "
              "from, so a change of preprocessing is refused instead of silently trained on")
    cache_miss: Literal["error", "teacher"] = option(
        "error", "a sample missing from the cache: raise, or compute it with the live teacher")
    teacher_fingerprint: Optional[str] = option(
        None, "expected teacher fingerprint of the cache when no teacher is passed to wrap()")

    # ---------------------------------------------------------------- stage 2
    logit_scale: Literal["auto", "student", "plugin"] = option(
        "auto", "learnable temperature: the student's own logit_scale ('auto' when it has one) or a plugin-owned "
                "one (not exported)")
    logit_scale_init: float = option(LN_INV_007, "initial value of a plugin-owned logit_scale (log space)")
    logit_scale_max: float = option(100.0, "clamp of exp(logit_scale)", gt=1.0)
    gather_across_ranks: bool = option(
        True, "all-gather embeddings (with gradient) across DDP ranks so negatives span the global batch")

    def validate(self, where=None):
        super().validate(where)
        where = where or "DCCLIPConfig"
        if self.switch_at_epoch is not None and self.steps_per_epoch is None:
            raise ConfigError(f"{where}.switch_at_epoch needs steps_per_epoch (the switch is checked once per "
                              "optimizer step)")
        if self.switch_at_step is not None and self.switch_at_epoch is not None:
            raise ConfigError(f"{where}: set switch_at_step or switch_at_epoch, not both")
        if self.stage == 2 and self.switch_step() is not None:
            raise ConfigError(f"{where}: stage=2 starts in the last stage; a switch step makes no sense")
        if self.image_weight == 0 and self.text_weight == 0 and self.embedding_weight == 0:
            raise ConfigError(f"{where}: image_weight, text_weight and embedding_weight are all 0: stage 1 would "
                              "have no loss")

    def switch_step(self) -> Optional[int]:
        """The optimizer step after which stage 2 begins (None: never)."""
        if self.switch_at_step is not None:
            return self.switch_at_step
        if self.switch_at_epoch is not None:
            return self.switch_at_epoch * self.steps_per_epoch
        return None
