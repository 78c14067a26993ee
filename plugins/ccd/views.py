"""The two views of each unlabeled image, sampled deterministically per sample.

* regular view: photometric augmentation only (same geometry as the input);
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


# --------------------------------------------------------------------------------------- photometric
@dataclasses.dataclass
class Photometric:
    """One view's photometric parameters (neutral values = no-op)."""

    multiply: float = 1.0
    noise_std: float = 0.0
    invert: bool = False
    dropout: float = 0.0
    brightness: float = 1.0
    saturation: float = 1.0
    channel_order: tuple[int, int, int] = (0, 1, 2)
    blur_sigma: float = 0.0
    sharpen: float = 0.0
    gamma: float = 1.0
    contrast: float = 1.0
    seed: int = 0  # of the per-pixel noise / dropout draws


def sample_photometric(rng: np.random.Generator, cfg: ViewConfig) -> Photometric:
    """Stages in the order of the paper's pipeline (arithmetic, colour, blur, contrast); each stage picks one op."""
    p = Photometric(seed=int(rng.integers(0, 2**63 - 1)))
    if not cfg.photometric or rng.random() < cfg.photometric_skip_probability:
        return p
    stage = lambda: rng.random() < cfg.photometric_op_probability  # noqa: E731
    if stage():
        op = int(rng.integers(4))
        if op == 0:
            p.noise_std = float(rng.uniform(0.0, 0.2))
        elif op == 1:
            p.multiply = float(rng.uniform(0.5, 1.5))
        elif op == 2:
            p.invert = True
        else:
            p.dropout = float(rng.uniform(0.0, 0.1))
    if stage():
        op = int(rng.integers(4))
        if op == 0:
            p.brightness = float(rng.uniform(0.5, 1.5))
        elif op == 1:
            p.saturation = float(rng.uniform(0.5, 1.5))
        elif op == 2:
            p.saturation = 1.0 - float(rng.uniform(0.0, 1.0))  # grayscale blend
        else:
            p.channel_order = tuple(int(c) for c in rng.permutation(3))
    if stage():
        if rng.random() < 0.5:
            p.blur_sigma = float(rng.uniform(0.5, 1.5))
        else:
            p.sharpen = float(rng.uniform(0.0, 0.5))
    if stage():
        if rng.random() < 0.5:
            p.gamma = float(rng.uniform(0.5, 2.0))
        else:
            p.contrast = float(rng.uniform(0.5, 1.0))
    return p


_LAPLACE = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def _filter_kernel(p: Photometric, k: int = 5) -> torch.Tensor:
    kernel = torch.zeros(k, k, dtype=torch.float64)
    if p.blur_sigma > 0:
        ax = torch.arange(k, dtype=torch.float64) - k // 2
        g = torch.exp(-(ax ** 2) / (2 * p.blur_sigma ** 2))
        kernel = torch.outer(g, g)
        return kernel / kernel.sum()
    kernel[k // 2, k // 2] = 1.0
    if p.sharpen > 0:
        kernel[k // 2 - 1:k // 2 + 2, k // 2 - 1:k // 2 + 2] += p.sharpen * _LAPLACE.double()
    return kernel


def apply_photometric(images: torch.Tensor, params: list[Photometric]) -> torch.Tensor:
    """Apply per-sample photometric parameters to `[B, C, H, W]` images in [0, 1], batched.

    A stage no sample uses is skipped, and a sample with neutral parameters is passed through by `where`, so
    each sample's output is bit-identical whatever else is in its batch.
    """
    b, c, h, w = images.shape
    dev, dt = images.device, images.dtype
    col = lambda values: torch.tensor(values, device=dev, dtype=dt).view(b, 1, 1, 1)  # noqa: E731
    on = lambda flags: torch.tensor(flags, device=dev).view(b, 1, 1, 1)  # noqa: E731
    x = images
    # arithmetic: multiply, additive noise, pixel dropout, invert
    if any(p.multiply != 1 for p in params):
        x = x * col([p.multiply for p in params])
    if any(p.noise_std > 0 or p.dropout > 0 for p in params):
        noise = np.zeros((b, c, h, w), dtype=np.float32)
        keep = np.ones((b, 1, h, w), dtype=np.float32)
        for i, p in enumerate(params):
            if p.noise_std > 0 or p.dropout > 0:
                rng = np.random.default_rng(p.seed)
                if p.noise_std > 0:
                    noise[i] = rng.standard_normal((c, h, w), dtype=np.float32) * p.noise_std
                if p.dropout > 0:
                    keep[i] = rng.random((1, h, w), dtype=np.float32) >= p.dropout
        x = (x + torch.from_numpy(noise).to(dev, dt)) * torch.from_numpy(keep).to(dev, dt)
    x = x.clamp(0, 1)
    if any(p.invert for p in params):
        x = torch.where(on([p.invert for p in params]), 1 - x, x)
    # colour: brightness, channel order, saturation / grayscale blend
    if any(p.brightness != 1 for p in params):
        x = (x * col([p.brightness for p in params])).clamp(0, 1)
    if c == 3 and any(p.channel_order != (0, 1, 2) for p in params):
        order = torch.tensor([p.channel_order for p in params], device=dev).view(b, 3, 1, 1).expand(b, 3, h, w)
        x = torch.gather(x, 1, order)
    if c == 3 and any(p.saturation != 1 for p in params):
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        blended = (gray + col([p.saturation for p in params]) * (x - gray)).clamp(0, 1)
        x = torch.where(on([p.saturation != 1 for p in params]), blended, x)
    # blur / sharpen: one depthwise 5x5 conv with a kernel per sample
    filtered = [p.blur_sigma > 0 or p.sharpen > 0 for p in params]
    if any(filtered):
        kernels = torch.stack([_filter_kernel(p) for p in params]).to(dev, dt)
        kernels = kernels.repeat_interleave(c, dim=0).unsqueeze(1)
        padded = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
        out = F.conv2d(padded, kernels, groups=b * c).view(b, c, h, w).clamp(0, 1)
        x = torch.where(on(filtered), out, x)
    # contrast: gamma, linear contrast about mid-grey
    if any(p.gamma != 1 for p in params):
        x = torch.where(on([p.gamma != 1 for p in params]), x.clamp_min(1e-6) ** col([p.gamma for p in params]), x)
    if any(p.contrast != 1 for p in params):
        stretched = (0.5 + col([p.contrast for p in params]) * (x - 0.5)).clamp(0, 1)
        x = torch.where(on([p.contrast != 1 for p in params]), stretched, x)
    return x


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
    regular_params = [sample_photometric(rng, cfg) for rng in rngs]
    irregular_params = [sample_photometric(rng, cfg) for rng in rngs]
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
