"""The two views of each unlabeled image, sampled deterministically per sample.

* regular view: photometric augmentation only (same geometry as the input; `photometric.py`);
* irregular view: an independent photometric augmentation warped by a random affine map (probability
  `affine_probability`), else the un-augmented image with the identity matrix.

`theta` is the 3×3 affine matrix in normalised [-1, 1] coordinates (align_corners=False) that maps a point
of the irregular view to the point of the regular view it was sampled from, i.e. exactly what
`F.affine_grid(theta[:, :2])` + `F.grid_sample` expect: `irregular = grid_sample(regular_geometry, theta)`.
The same call warps the regular view's character masks onto the irregular view.

Every random number of a sample comes from a generator seeded by (config seed, the sample's id, optimizer
step), so a sample gets the same views whichever micro-batch, process or batch size it lands in.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import ViewConfig
from .photometric import apply_photometric, sample_photometric

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers; nearby inputs give unrelated seeds."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h


def content_ids(pixel_values: torch.Tensor) -> torch.Tensor:
    """An exact integer fingerprint per image, for batches that carry no `ccd_seed`.

    Integer arithmetic, so the value of a sample does not depend on which batch it is in."""
    q = (pixel_values.detach().float() * 255).round().to(torch.int64).flatten(1)
    weights = torch.arange(q.shape[1], device=q.device, dtype=torch.int64) % 251 + 1
    return (q * weights).sum(1)


def sample_seeds(pixel_values: torch.Tensor, sample_ids: torch.Tensor | None, step: int, base_seed: int) -> list[int]:
    ids = sample_ids.reshape(-1) if sample_ids is not None else content_ids(pixel_values)
    if ids.numel() != pixel_values.shape[0]:
        raise ValueError(f"ccd_seed has {ids.numel()} values for a batch of {pixel_values.shape[0]} images")
    return [mix_seed(base_seed, int(i), step) for i in ids.tolist()]


# ------------------------------------------------------------------------------------------ geometry
def affine_theta(size: tuple[int, int], *, scale: tuple[float, float] = (1.0, 1.0),
                 translate: tuple[float, float] = (0.0, 0.0), rotate: float = 0.0,
                 shear: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Normalised 3×3 `theta` (irregular -> regular) of the pixel-space map
    p_irr = R(rotate)·Shear(shear)·Scale(scale)·p_reg + translate·(W, H), about the image centre.

    Built in pixels, then conjugated into normalised coordinates, so rotations stay rigid on a 32×128 image.
    """
    h, w = size
    sx, sy = scale
    shx, shy = math.radians(shear[0]), math.radians(shear[1])
    rot = math.radians(rotate)
    scale_m = np.diag([sx, sy])
    shear_m = np.array([[1.0, math.tan(shx)], [math.tan(shy), 1.0]])
    rot_m = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    forward = np.eye(3)
    forward[:2, :2] = rot_m @ shear_m @ scale_m
    forward[:2, 2] = [translate[0] * w, translate[1] * h]
    # Centred pixel coordinates u = x - (W-1)/2 map to align_corners=False normalised ones by 2u/W.
    norm = np.diag([2.0 / w, 2.0 / h, 1.0])
    return norm @ np.linalg.inv(forward) @ np.linalg.inv(norm)


def sample_affine(rng: np.random.Generator, cfg: ViewConfig, size: tuple[int, int]) -> np.ndarray | None:
    """A random normalised theta, or None (identity, un-augmented irregular view)."""
    if rng.random() >= cfg.affine_probability:
        return None
    u = lambda r: float(rng.uniform(r[0], r[1]))  # noqa: E731
    return affine_theta(size, scale=(u(cfg.scale_x), u(cfg.scale_y)), translate=(u(cfg.translate), u(cfg.translate)),
                        rotate=u(cfg.rotate_degrees), shear=(u(cfg.shear_x_degrees), u(cfg.shear_y_degrees)))


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample `[B, C, H, W]` (regular geometry) into the irregular view; outside the image is 0."""
    grid = F.affine_grid(theta[:, :2].to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# -------------------------------------------------------------------------------------------- views
@dataclasses.dataclass
class TwoViews:
    regular: torch.Tensor      # [B, C, H, W] in [0, 1]
    irregular: torch.Tensor    # [B, C, H, W] in [0, 1]
    theta: torch.Tensor        # [B, 3, 3], irregular -> regular, normalised coordinates
    warped: torch.Tensor       # [B] bool: the affine branch was taken


def make_views(images: torch.Tensor, seeds: list[int], cfg: ViewConfig) -> TwoViews:
    """Both views of `[B, C, H, W]` images in [0, 1]; sample i depends only on `seeds[i]` and its image."""
    b, _, h, w = images.shape
    rngs = [np.random.default_rng(s) for s in seeds]
    draw = lambda rng: sample_photometric(rng, cfg.photometric_skip_probability,  # noqa: E731
                                          cfg.photometric_stage_probability, cfg.photometric)
    regular_params = [draw(rng) for rng in rngs]
    irregular_params = [draw(rng) for rng in rngs]
    thetas = [sample_affine(rng, cfg, (h, w)) for rng in rngs]
    warped = torch.tensor([t is not None for t in thetas], device=images.device)
    theta = torch.from_numpy(np.stack([t if t is not None else np.eye(3) for t in thetas])).to(images.device,
                                                                                             torch.float32)
    regular = apply_photometric(images, regular_params)
    irregular = images
    if bool(warped.any()):
        moved = warp(apply_photometric(images, irregular_params), theta)
        irregular = torch.where(warped.view(b, 1, 1, 1), moved, images)
    return TwoViews(regular=regular, irregular=irregular, theta=theta, warped=warped)
