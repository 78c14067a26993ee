"""Config of the `ccd` plugin (defaults follow the CCD paper's code; see README.md)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from vlmdistill.config import PluginConfig, option
from vlmdistill.data.image_stats import IMAGENET_MEAN, IMAGENET_STD
from vlmdistill.errors import ConfigError

INSTANCES = ("characters", "slices")


def _check_range(where: str, name: str, value: tuple[float, float]) -> None:
    if value[0] > value[1]:
        raise ConfigError(f"{where}.{name}: range {list(value)} has its low end above its high end")


@dataclasses.dataclass
class ViewConfig(PluginConfig):
    """How the two views of each unlabeled image are made."""

    affine_probability: float = option(
        0.7, "probability that the irregular view is the photometric view warped by a random affine map; otherwise "
             "it is the un-augmented image with the identity matrix", ge=0.0, le=1.0)
    scale_x: tuple[float, float] = option((0.6, 1.1), "horizontal scale range of the affine map")
    scale_y: tuple[float, float] = option((0.6, 1.1), "vertical scale range of the affine map")
    translate: tuple[float, float] = option((-0.02, 0.02), "translation range, as a fraction of width / height")
    rotate_degrees: tuple[float, float] = option((-10.0, 10.0), "rotation range in degrees")
    shear_x_degrees: tuple[float, float] = option((-45.0, 45.0), "horizontal shear range in degrees")
    shear_y_degrees: tuple[float, float] = option((-10.0, 10.0), "vertical shear range in degrees")
    photometric: bool = option(True, "apply the reference's photometric augmentation to both views (photometric.py)")
    photometric_skip_probability: float = option(
        0.2, "probability that a view gets no photometric augmentation at all", ge=0.0, le=1.0)
    photometric_stage_probability: float = option(
        0.7, "probability of each of the colour, blur, contrast and weather stages of an augmented view (the "
             "arithmetic stage always applies)", ge=0.0, le=1.0)

    def validate(self, where=None):
        super().validate(where)
        where = where or "views"
        for name in ("scale_x", "scale_y", "translate", "rotate_degrees", "shear_x_degrees", "shear_y_degrees"):
            _check_range(where, name, getattr(self, name))
        if min(self.scale_x[0], self.scale_y[0]) <= 0:
            raise ConfigError(f"{where}: scale ranges must be positive")
        if max(abs(v) for v in self.shear_x_degrees + self.shear_y_degrees) >= 89.0:
            raise ConfigError(f"{where}: shear angles must lie strictly inside (-89, 89) degrees")


@dataclasses.dataclass
class CCDConfig(PluginConfig):
    """Character-to-character distillation: DINO on segmented characters paired across two views."""

    # --- segmentation ---------------------------------------------------------------------------
    seg_blocks: list[int] = option(
        default_factory=lambda: [2, 4, 6],
        help="1-based transformer blocks whose outputs feed the segmentation head")
    seg_hidden_channels: int = option(128, "channels of the segmentation head's 3x3 convs and upsamplings", ge=8)
    seg_map_channels: int = option(64, "channels each block map is reduced to before concatenation", ge=8)
    seg_groups: int = option(
        8, "GroupNorm groups in the segmentation head (the original uses BatchNorm, which would make k micro-batches "
           "differ from one big batch)", ge=1)
    pseudo_mask_fraction: float = option(
        0.3, "fraction of training during which character masks come from k-means pseudo masks; afterwards from the "
             "student's own segmentation (the reference: 30 of its ~100 one-million-image epochs)", ge=0.0, le=1.0)
    kmeans_iterations: int = option(10, "Lloyd iterations of the per-image 2-means on grey levels", ge=1)
    max_characters: int = option(26, "character slots per image (connected components, leftmost first)", ge=1)
    min_character_pixels: int = option(30, "smallest connected component (pixels) counted as a character", ge=1)
    warp_threshold: float = option(0.1, "a warped slot mask pixel is on when its bilinear value exceeds this",
                                   gt=0.0, lt=1.0)
    instances: str = option(
        "characters", "what is distilled: 'characters' (CCD: connected components of the text mask, paired across "
                      "the views through the affine map) or 'slices' (the sequence-level baseline: `slices` vertical "
                      "strips of the token grid, paired by position in both views whatever the warp)")
    slices: int = option(4, "strips per image when instances='slices'", ge=1)
    # --- distillation head and loss ---------------------------------------------------------------
    out_dim: int = option(65536, "prototypes of the DINO head", ge=2)
    head_hidden_dim: int = option(2048, "hidden width of the DINO head's MLP", ge=1)
    bottleneck_dim: int = option(256, "width of the L2-normalised bottleneck before the prototypes", ge=1)
    norm_last_layer: bool = option(
        False, "fix the weight-norm gain of the prototype layer to 1 (the CCD configs use False for ViT-Small)")
    freeze_last_layer_fraction: float = option(
        0.01, "fraction of training during which the prototype layer gets no optimizer update at all (its gradient "
              "is dropped before each step, as in the reference's cancel_gradients_last_layer: 1 of ~100 epochs)",
        ge=0.0, le=1.0)
    student_temperature: float = option(0.1, "student softmax temperature", gt=0.0)
    teacher_temperature: float = option(0.04, "teacher softmax temperature (after centring)", gt=0.0)
    center_momentum: float = option(0.9, "EMA momentum of the teacher centre", ge=0.0, le=1.0)
    seg_weight: float = option(1.0, "weight of the segmentation loss in the total", ge=0.0)
    distill_weight: float = option(1.0, "weight of the character distillation loss in the total", ge=0.0)
    # --- EMA teacher ------------------------------------------------------------------------------
    teacher_momentum: float = option(0.9995, "EMA momentum at step 0; rises to 1 on a cosine schedule over the run",
                                     ge=0.0, le=1.0)
    total_steps: Optional[int] = option(
        None, "optimizer steps of the whole run, which the fractions and the cosine momentum schedule refer to; "
              "None = the HF Trainer's max_steps (DistillationCallback passes it); a hand-written loop must set it",
        ge=1)
    # --- inputs -----------------------------------------------------------------------------------
    image_mean: tuple[float, float, float] = option(
        IMAGENET_MEAN, "per-channel mean the pixel_values were normalised with (undone for augmentation)")
    image_std: tuple[float, float, float] = option(
        IMAGENET_STD, "per-channel std the pixel_values were normalised with")
    seed: int = option(0, "base seed of the view sampling, mixed with each sample's ccd_seed and the step")
    views: ViewConfig = option(default_factory=ViewConfig, help="view augmentation ranges")

    def validate(self, where=None):
        super().validate(where)
        where = where or "CCDConfig"
        if self.instances not in INSTANCES:
            raise ConfigError(f"{where}.instances: {self.instances!r}; choose one of {', '.join(INSTANCES)}")
        if not self.seg_blocks:
            raise ConfigError(f"{where}.seg_blocks: give at least one block")
        if any(b < 1 for b in self.seg_blocks):
            raise ConfigError(f"{where}.seg_blocks: blocks are counted from 1, got {self.seg_blocks}")
        if len(set(self.seg_blocks)) != len(self.seg_blocks):
            raise ConfigError(f"{where}.seg_blocks: a block is listed twice: {self.seg_blocks}")
        if self.seg_hidden_channels % self.seg_groups or self.seg_map_channels % self.seg_groups:
            raise ConfigError(f"{where}.seg_groups: {self.seg_groups} must divide seg_hidden_channels "
                              f"({self.seg_hidden_channels}) and seg_map_channels ({self.seg_map_channels})")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"{where}.image_std: values must be positive, got {list(self.image_std)}")
        self.views.validate(f"{where}.views")
