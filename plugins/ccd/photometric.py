"""CCD's photometric augmentation: the reference pipeline's five stages and 48 operations, in torch.

The reference (TongkunGuan/CCD, `Dino/dataset/augmentation_pipelines.py`, `augmentation_severity: 5` in the
pretraining configs) runs imgaug's

    Sometimes(0.2, Identity, Sequential[arithmetic, colour, blur, contrast, weather])

on each view: with probability 0.2 the view is left as it is; otherwise the *arithmetic* stage always applies one
of 21 operations, and the colour (one of 9), blur (sharpen, or one of 5 blurs), contrast (one of 8) and weather
(one of 4) stages each apply with probability 0.7. The operations and their parameter ranges here are those of the
reference, re-implemented on `[C, H, W]` tensors in [0, 1]; where imgaug's algorithm is not reproduced exactly
(its weather generators, CLAHE's tiling, the colour space of histogram equalisation) the comment at the operation
says what is done instead.

Each view's operations and parameters come from its own generator, and each image is processed on its own, so a
sample's view is bit-identical whatever batch it is in.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Params = dict
Op = tuple[str, Callable[[np.random.Generator], Params], Callable[[torch.Tensor, Params], torch.Tensor]]


@dataclasses.dataclass
class Photometric:
    """One view's chosen operations, in order: `(name, parameters)`; empty = the view is left as it is."""

    ops: list[tuple[str, Params]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------- helpers
def _noise(p: Params, shape: tuple[int, ...], device, kind: str = "rand") -> torch.Tensor:
    """Per-view random field from the view's own seed (drawn on the host: the same on every device)."""
    g = torch.Generator().manual_seed(int(p["seed"]) % (2**63 - 1))
    if kind == "rand":
        out = torch.rand(shape, generator=g)
    elif kind == "normal":
        out = torch.randn(shape, generator=g)
    elif kind == "laplace":
        u = torch.rand(shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
        out = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:  # poisson with a random sign
        lam = torch.full(shape, float(p["lam"]))
        out = torch.poisson(lam, generator=g) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return out.to(device)


def _field_shape(x: torch.Tensor, per_channel: bool) -> tuple[int, int, int]:
    c, h, w = x.shape
    return (c if per_channel else 1, h, w)


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same 2-D kernel on every channel, edges replicated."""
    k = kernel.to(x.device, x.dtype)
    kh, kw = k.shape
    padded = F.pad(x.unsqueeze(0), (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2), mode="replicate")
    return F.conv2d(padded, k.expand(x.shape[0], 1, kh, kw).contiguous(), groups=x.shape[0])[0]


def _neighbourhoods(x: torch.Tensor, k: int) -> torch.Tensor:
    """`[C, k*k, H, W]` windows around every pixel (edges replicated)."""
    c, h, w = x.shape
    padded = F.pad(x.unsqueeze(0), (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="replicate")
    return F.unfold(padded, k).view(c, k * k, h, w)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    ax = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).float()


def _motion_kernel(k: int, angle: float) -> torch.Tensor:
    """A line of length `k` through the centre at `angle` degrees (imgaug's MotionBlur, direction 0)."""
    kernel = torch.zeros(k, k)
    c = (k - 1) / 2
    dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for t in np.linspace(-c, c, 4 * k):
        kernel[int(round(c + t * dy)), int(round(c + t * dx))] = 1.0
    return kernel / kernel.sum()


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 3:
        return x[:1]
    return 0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[0], x[1], x[2]
    high, low = x.max(0).values, x.min(0).values
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    return torch.stack([hue, sat, high])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv[0] % 1.0, hsv[1].clamp(0, 1), hsv[2].clamp(0, 1)
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)])


def _in_hsv(x: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if x.shape[0] < 3:
        return x  # hue and saturation do not exist for a grey image
    return _hsv_to_rgb(change(_rgb_to_hsv(x)))


def _with_luma(x: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Change the luma (YCbCr's Y) and keep the chroma."""
    if x.shape[0] < 3:
        return change(x)
    y = _luma(x)
    return (x + (change(y) - y)).clamp(0, 1)


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().long()


def _equalise(channel: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of one `[H, W]` channel (256 levels)."""
    levels = _levels(channel)
    hist = torch.bincount(levels.flatten(), minlength=256).to(torch.float64)
    cdf = hist.cumsum(0)
    first = cdf[hist > 0][0]
    if cdf[-1] == first:
        return channel
    lut = ((cdf - first) / (cdf[-1] - first)).clamp(0, 1).to(channel.dtype)
    return lut[levels]


def _clahe(channel: torch.Tensor, clip_limit: float, tile: int) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of one `[H, W]` channel: per-tile clipped histograms,
    excess spread evenly, mappings interpolated bilinearly between tile centres (OpenCV's scheme, simplified)."""
    h, w = channel.shape
    ty, tx = max(1, math.ceil(h / tile)), max(1, math.ceil(w / tile))
    levels = _levels(channel)
    rows = (torch.arange(h, device=channel.device) * ty // h).view(h, 1).expand(h, w)
    cols = (torch.arange(w, device=channel.device) * tx // w).view(1, w).expand(h, w)
    tile_index = (rows * tx + cols).flatten()
    hist = torch.zeros(ty * tx * 256, dtype=torch.float64, device=channel.device)
    hist.index_add_(0, tile_index * 256 + levels.flatten(), torch.ones(h * w, dtype=torch.float64,
                                                                       device=channel.device))
    hist = hist.view(ty * tx, 256)
    area = hist.sum(1, keepdim=True)
    limit = (clip_limit * area / 256).clamp_min(1)
    excess = (hist - limit).clamp_min(0).sum(1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256
    maps = (hist.cumsum(1) / area.clamp_min(1)).view(ty, tx, 256).to(channel.dtype)
    # bilinear interpolation between the four nearest tile centres
    fy = ((torch.arange(h, device=channel.device, dtype=channel.dtype) + 0.5) * ty / h - 0.5).clamp(0, ty - 1)
    fx = ((torch.arange(w, device=channel.device, dtype=channel.dtype) + 0.5) * tx / w - 0.5).clamp(0, tx - 1)
    y0, x0 = fy.floor().long(), fx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=ty - 1), (x0 + 1).clamp(max=tx - 1)
    wy, wx = (fy - y0).view(h, 1), (fx - x0).view(1, w)
    pick = lambda yy, xx: maps[yy.view(h, 1), xx.view(1, w), levels]  # noqa: E731
    top = pick(y0, x0) * (1 - wx) + pick(y0, x1) * wx
    bottom = pick(y1, x0) * (1 - wx) + pick(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _kelvin_rgb(kelvin: float) -> torch.Tensor:
    """White point of a black body at `kelvin` (Tanner Helland's fit), normalised to its largest channel."""
    t = kelvin / 100
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    g = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
    rgb = torch.tensor([r, g, b]).clamp(1, 255)
    return rgb / rgb.max()


def _low_frequency(p: Params, shape: tuple[int, int], device, octaves: int, base: int) -> torch.Tensor:
    """Smooth noise in [0, 1]: `octaves` bicubically upsampled random grids, coarse ones weighted more."""
    h, w = shape
    g = torch.Generator().manual_seed(int(p["seed"]) % (2**63 - 1))
    total = torch.zeros(1, 1, h, w)
    for octave in range(octaves):
        cells = base * 2 ** octave
        grid = torch.rand(1, 1, max(2, round(h / w * cells)) + 1, cells + 1, generator=g)
        total += F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True) / 2 ** octave
    total = total - total.min()
    return (total / total.max().clamp_min(1e-6))[0].to(device)


def _streaks(p: Params, x: torch.Tensor, length: int, sigma: float) -> torch.Tensor:
    """Sparse drops/flakes (density `p["density"]`) smeared along `p["angle"]` into streaks of `length` px."""
    _, h, w = x.shape
    drops = (_noise(p, (1, h, w), x.device) < p["density"]).to(x.dtype)
    if sigma > 0:
        drops = _conv(drops, _gaussian_kernel(sigma)) * (2 * math.pi * sigma ** 2)
    if length > 1:
        drops = _conv(drops, _motion_kernel(length, p["angle"])) * length ** 0.5
    return drops.clamp(0, 1)


def _screen(x: torch.Tensor, layer: torch.Tensor, intensity: float) -> torch.Tensor:
    """Lighten `x` with a `[1, H, W]` layer of brightness `intensity`."""
    return 1 - (1 - x) * (1 - intensity * layer)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    mode = "RGB" if array.shape[2] == 3 else "L"
    image = Image.fromarray(array if mode == "RGB" else array[..., 0], mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode), dtype=np.float32) / 255
    decoded = decoded if decoded.ndim == 3 else decoded[..., None]
    return torch.from_numpy(decoded).permute(2, 0, 1).to(x.device, x.dtype)


def _uniform(lo: float, hi: float) -> Callable[[np.random.Generator], float]:
    return lambda rng: float(rng.uniform(lo, hi))


def _seeded(**draws) -> Callable[[np.random.Generator], Params]:
    def sample(rng: np.random.Generator) -> Params:
        out = {"seed": int(rng.integers(0, 2**63 - 1))}
        out.update({name: draw(rng) for name, draw in draws.items()})
        return out
    return sample


def _coin(p: float) -> Callable[[np.random.Generator], bool]:
    return lambda rng: bool(rng.random() < p)


def _blend(x: torch.Tensor, out: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * x + alpha * out


def _replace(x: torch.Tensor, p: Params, fraction: float, value: Callable[[torch.Tensor], torch.Tensor],
             per_channel: bool) -> torch.Tensor:
    field = _noise(p, (2, *_field_shape(x, per_channel)), x.device)
    return torch.where(field[0] < fraction, value(field[1]).expand_as(x), x)


# ------------------------------------------------------------------------------------------ arithmetic
def _emboss_kernel(strength: float) -> torch.Tensor:
    s = strength
    return torch.tensor([[-1 - s, -s, 0.0], [-s, 1.0, s], [0.0, s, 1 + s]])


def _directed_edge_kernel(direction: float) -> torch.Tensor:
    """imgaug's DirectedEdgeDetect: neighbours weighted by how closely they face `direction` (0..1 of a turn)."""
    angle = direction * 2 * math.pi
    d = torch.tensor([math.cos(angle), math.sin(angle)])
    kernel = torch.zeros(3, 3)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx or dy:
                v = torch.tensor([float(dx), float(dy)])
                kernel[dy + 1, dx + 1] = torch.clamp(torch.dot(v / v.norm(), d), min=0) ** 2
    kernel = kernel / kernel.sum()
    kernel[1, 1] = -1.0
    return kernel


_EDGE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_EDGE_ENHANCE_MORE = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 9.0, -1.0], [-1.0, -1.0, -1.0]])   # PIL's kernel
_CONTOUR = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])             # PIL's, offset 255


def _edges(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return _conv(x, kernel).abs().clamp(0, 1)


ARITHMETIC: list[Op] = [
    ("add_elementwise", _seeded(), lambda x, p: x + (_noise(p, _field_shape(x, False), x.device) * 80 - 40) / 255),
    ("gaussian_noise", _seeded(scale=_uniform(0, 0.2)),
     lambda x, p: x + _noise(p, _field_shape(x, False), x.device, "normal") * p["scale"]),
    ("laplace_noise", _seeded(scale=_uniform(0, 0.2)),
     lambda x, p: x + _noise(p, _field_shape(x, False), x.device, "laplace") * p["scale"]),
    ("poisson_noise", _seeded(lam=_uniform(0, 40)),
     lambda x, p: x + _noise(p, _field_shape(x, False), x.device, "poisson") / 255),
    ("multiply", _seeded(per_channel=_coin(0.5)),
     lambda x, p: x * (0.5 + _noise(p, (x.shape[0] if p["per_channel"] else 1, 1, 1), x.device))),
    ("multiply_elementwise", _seeded(per_channel=_coin(0.5)),
     lambda x, p: x * (0.5 + _noise(p, _field_shape(x, p["per_channel"]), x.device))),
    ("dropout", _seeded(rate=_uniform(0, 0.1), per_channel=_coin(0.5)),
     lambda x, p: x * (_noise(p, _field_shape(x, p["per_channel"]), x.device) >= p["rate"])),
    ("coarse_dropout", _seeded(per_channel=_coin(0.5)),   # p 0.02 on a grid of 15% of the image size
     lambda x, p: x * F.interpolate((_noise(p, (1, x.shape[0] if p["per_channel"] else 1,
                                                max(2, round(0.15 * x.shape[1])), max(2, round(0.15 * x.shape[2]))),
                                           x.device) >= 0.02).to(x.dtype), size=x.shape[1:], mode="nearest")[0]),
    ("dropout2d", _seeded(),   # each channel dropped with p 0.5, at least one kept
     lambda x, p: x * _keep_channels(_noise(p, (x.shape[0],), x.device)).view(-1, 1, 1)),
    ("impulse_noise", _seeded(),
     lambda x, p: _replace(x, p, 0.1, lambda u: (u < 0.5).to(x.dtype), per_channel=True)),
    ("salt_and_pepper", _seeded(),
     lambda x, p: _replace(x, p, 0.1, lambda u: (u < 0.5).to(x.dtype), per_channel=False)),
    ("salt", _seeded(), lambda x, p: _replace(x, p, 0.1, lambda u: torch.ones_like(u), per_channel=False)),
    ("pepper", _seeded(), lambda x, p: _replace(x, p, 0.1, lambda u: torch.zeros_like(u), per_channel=False)),
    ("invert", _seeded(apply=_coin(0.15)), lambda x, p: 1 - x if p["apply"] else x),
    ("solarize", _seeded(apply=_coin(0.5), threshold=_uniform(32 / 255, 128 / 255)),
     lambda x, p: torch.where(x >= p["threshold"], 1 - x, x) if p["apply"] else x),
    ("jpeg", _seeded(quality=lambda rng: int(100 - rng.integers(70, 100))), lambda x, p: _jpeg(x, p["quality"])),
    ("emboss", _seeded(alpha=_uniform(0, 1), strength=_uniform(0.5, 1.5)),
     lambda x, p: _blend(x, _conv(x, _emboss_kernel(p["strength"])), p["alpha"])),
    ("edge_detect", _seeded(alpha=_uniform(0, 1)), lambda x, p: _blend(x, _edges(x, _EDGE), p["alpha"])),
    ("directed_edge_detect", _seeded(alpha=_uniform(0, 1), direction=_uniform(0, 1)),
     lambda x, p: _blend(x, _edges(x, _directed_edge_kernel(p["direction"])), p["alpha"])),
    ("edge_enhance_more", _seeded(), lambda x, p: _conv(x, _EDGE_ENHANCE_MORE)),
    ("contour", _seeded(), lambda x, p: _conv(x, _CONTOUR) + 1),
]


def _keep_channels(u: torch.Tensor) -> torch.Tensor:
    keep = (u >= 0.5).float()
    if keep.sum() == 0:
        keep[u.argmax()] = 1.0
    return keep


# ---------------------------------------------------------------------------------------------- colour
COLOUR: list[Op] = [
    # hue in OpenCV's 0..180 units, as imgaug's WithColorspace(HSV) sees it: 50 units = 100 degrees
    ("hue_add", _seeded(shift=_uniform(0, 50)),
     lambda x, p: _in_hsv(x, lambda hsv: torch.stack([hsv[0] + p["shift"] / 180, hsv[1], hsv[2]]))),
    ("brightness_multiply_add", _seeded(mul=_uniform(0.5, 1.5), add=_uniform(-30, 30)),
     lambda x, p: _with_luma(x, lambda y: y * p["mul"] + p["add"] / 255)),
    ("hue_saturation_multiply", _seeded(hue=_uniform(0.5, 1.5), sat=_uniform(0.5, 1.5)),
     lambda x, p: _in_hsv(x, lambda hsv: torch.stack([hsv[0] * p["hue"], hsv[1] * p["sat"], hsv[2]]))),
    # imgaug's hue/saturation offsets are in 0..255 units of a full turn / of full saturation
    ("hue_saturation_add", _seeded(hue=_uniform(-50, 50), sat=_uniform(-50, 50)),
     lambda x, p: _in_hsv(x, lambda hsv: torch.stack([hsv[0] + p["hue"] / 255, hsv[1] + p["sat"] / 255, hsv[2]]))),
    ("hue_shift_large", _seeded(shift=_uniform(50, 100)),
     lambda x, p: _in_hsv(x, lambda hsv: torch.stack([hsv[0] + p["shift"] / 180, hsv[1], hsv[2]]))),
    ("grayscale", _seeded(alpha=_uniform(0, 1)), lambda x, p: _blend(x, _luma(x).expand_as(x), p["alpha"])),
    ("kmeans_quantize", _seeded(colours=lambda rng: int(rng.integers(2, 17))),
     lambda x, p: _kmeans_quantize(x, p)),
    ("uniform_quantize", _seeded(colours=lambda rng: int(rng.integers(2, 17))),
     lambda x, p: (torch.floor(x * p["colours"]).clamp(max=p["colours"] - 1) + 0.5) / p["colours"]),
    ("colour_temperature", _seeded(kelvin=_uniform(1100, 10000)),
     lambda x, p: x * _kelvin_rgb(p["kelvin"]).to(x.device, x.dtype)[:x.shape[0]].view(-1, 1, 1)
     if x.shape[0] == 3 else x),
]


def _kmeans_quantize(x: torch.Tensor, p: Params, iterations: int = 5) -> torch.Tensor:
    """Replace each pixel by the nearest of `colours` k-means centres of the image's colours."""
    c = x.shape[0]
    pixels = x.reshape(c, -1).T
    g = torch.Generator().manual_seed(int(p["seed"]) % (2**63 - 1))
    centres = pixels[torch.randperm(pixels.shape[0], generator=g)[:p["colours"]].to(x.device)]
    for _ in range(iterations):
        assign = torch.cdist(pixels, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, pixels)
        counts = torch.bincount(assign, minlength=centres.shape[0]).to(x.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres[torch.cdist(pixels, centres).argmin(1)].T.reshape(x.shape)


# ------------------------------------------------------------------------------------------------ blur
def _median(x: torch.Tensor, k: int) -> torch.Tensor:
    return _neighbourhoods(x, k).median(dim=1).values


def _bilateral(x: torch.Tensor, d: int, sigma_colour: float, sigma_space: float) -> torch.Tensor:
    k = d if d % 2 else d + 1
    windows = _neighbourhoods(x, k)                                  # [C, k*k, H, W]
    ax = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    space = torch.exp(-(ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2) / (2 * sigma_space ** 2)).view(1, -1, 1, 1)
    luma_windows = _neighbourhoods(_luma(x), k)
    colour = torch.exp(-((luma_windows - _luma(x).unsqueeze(1)) ** 2) / (2 * sigma_colour ** 2))
    weights = space * colour
    return (windows * weights).sum(1) / weights.sum(1)


def _sharpen(x: torch.Tensor, alpha: float, lightness: float) -> torch.Tensor:
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    effect = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0 + lightness, -1.0], [-1.0, -1.0, -1.0]])
    return _conv(x, (1 - alpha) * identity + alpha * effect)


BLURS: list[Op] = [
    ("gaussian_blur", _seeded(sigma=_uniform(0.5, 1.5)), lambda x, p: _conv(x, _gaussian_kernel(p["sigma"]))),
    ("average_blur", _seeded(k=lambda rng: int(rng.integers(2, 7))),
     lambda x, p: _conv(x, torch.full((p["k"], p["k"]), 1.0 / p["k"] ** 2))),
    ("median_blur", _seeded(k=lambda rng: int(rng.choice([3, 5, 7]))), lambda x, p: _median(x, p["k"])),
    ("motion_blur", _seeded(angle=_uniform(0, 360)), lambda x, p: _conv(x, _motion_kernel(5, p["angle"]))),
    ("bilateral_blur", _seeded(d=lambda rng: int(rng.integers(3, 11)), colour=_uniform(10, 250),
                               space=_uniform(10, 250)),
     lambda x, p: _bilateral(x, p["d"], p["colour"] / 255, p["space"])),
]
SHARPEN: Op = ("sharpen", _seeded(alpha=_uniform(0, 0.5), lightness=_uniform(0, 0.5)),
               lambda x, p: _sharpen(x, p["alpha"], p["lightness"]))


# -------------------------------------------------------------------------------------------- contrast
def _per_channel(x: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([change(channel) for channel in x])


CONTRAST: list[Op] = [
    ("gamma_contrast", _seeded(gamma=_uniform(0.5, 2.0)), lambda x, p: x.clamp_min(0) ** p["gamma"]),
    ("linear_contrast", _seeded(alpha=_uniform(0.5, 1.0)), lambda x, p: 0.5 + p["alpha"] * (x - 0.5)),
    ("sigmoid_contrast", _seeded(gain=_uniform(3, 10), cutoff=_uniform(0.4, 0.6)),
     lambda x, p: torch.sigmoid(p["gain"] * (x - p["cutoff"]))),
    ("log_contrast", _seeded(gain=_uniform(0.6, 1.4)), lambda x, p: p["gain"] * torch.log2(1 + x.clamp_min(0))),
    # imgaug equalises Lab's L; here YCbCr's Y, which keeps the hue the same way
    ("histogram_equalisation", _seeded(), lambda x, p: _with_luma(x, lambda y: _equalise(y[0]).unsqueeze(0))),
    ("all_channels_histogram_equalisation", _seeded(), lambda x, p: _per_channel(x, _equalise)),
    # imgaug's CLAHE defaults: clip limit 0.1..8, tiles of 3..21 px
    ("clahe", _seeded(clip=_uniform(0.1, 8), tile=lambda rng: int(rng.integers(3, 22))),
     lambda x, p: _with_luma(x, lambda y: _clahe(y[0], p["clip"], p["tile"]).unsqueeze(0))),
    ("all_channels_clahe", _seeded(clip=_uniform(0.1, 8), tile=lambda rng: int(rng.integers(3, 22))),
     lambda x, p: _per_channel(x, lambda ch: _clahe(ch, p["clip"], p["tile"]))),
]


# --------------------------------------------------------------------------------------------- weather
# imgaug draws fog and clouds from its CloudLayer generator and snow and rain from its particle layers; these are
# simpler generators of the same kind: smooth noise layers blended toward a bright tone, sparse particles smeared
# into flakes or streaks along a random direction.
WEATHER: list[Op] = [
    ("fog", _seeded(density=_uniform(0.4, 0.8), intensity=_uniform(220 / 255, 1.0)), lambda x, p: _fog(x, p)),
    ("clouds", _seeded(intensity=_uniform(0.7, 1.0), threshold=_uniform(0.3, 0.6)),
     lambda x, p: _cloud_layer(x, p)),
    ("snowflakes", _seeded(density=_uniform(0.01, 0.075), size=_uniform(0.1, 0.4), speed=_uniform(0.01, 0.05),
                           angle=_uniform(60, 120), intensity=_uniform(0.7, 1.0)),
     lambda x, p: _screen(x, _streaks(p, x, 1 + round(p["speed"] * 40), 0.5 + 2 * p["size"]), p["intensity"])),
    ("rain", _seeded(density=_uniform(0.01, 0.05), speed=_uniform(0.1, 0.3), angle=_uniform(70, 110),
                     intensity=_uniform(0.5, 0.9)),
     lambda x, p: _screen(x, _streaks(p, x, 3 + round(p["speed"] * 25), 0.0), p["intensity"])),
]


def _fog(x: torch.Tensor, p: Params) -> torch.Tensor:
    alpha = p["density"] * _low_frequency(p, x.shape[1:], x.device, 2, 2)
    return x * (1 - alpha) + p["intensity"] * alpha


def _cloud_layer(x: torch.Tensor, p: Params) -> torch.Tensor:
    noise = _low_frequency(p, x.shape[1:], x.device, 4, 4)
    alpha = ((noise - p["threshold"]) / (1 - p["threshold"])).clamp(0, 1) * 0.9
    return x * (1 - alpha) + p["intensity"] * alpha


#: the reference's stages: (name, probability the stage applies once the view is augmented, its operations)
STAGES = (("arithmetic", None, ARITHMETIC), ("colour", "stage", COLOUR), ("blur", "stage", [SHARPEN, *BLURS]),
          ("contrast", "stage", CONTRAST), ("weather", "stage", WEATHER))
OPERATIONS = {name: (sample, apply) for _, _, ops in STAGES for name, sample, apply in ops}


def sample_photometric(rng: np.random.Generator, skip_probability: float, stage_probability: float,
                       enabled: bool = True) -> Photometric:
    """One view's operations: none with probability `skip_probability`; else one arithmetic operation, then each of
    the colour, blur, contrast and weather stages with probability `stage_probability` (one operation each; the
    blur stage is the sharpen filter or, as often, one of five blurs)."""
    view = Photometric()
    if not enabled or rng.random() < skip_probability:
        return view
    for stage, gated, ops in STAGES:
        if gated is not None and rng.random() >= stage_probability:
            continue
        if stage == "blur":
            name, sample, _ = SHARPEN if rng.random() < 0.5 else BLURS[int(rng.integers(len(BLURS)))]
        else:
            name, sample, _ = ops[int(rng.integers(len(ops)))]
        view.ops.append((name, sample(rng)))
    return view


def apply_photometric(images: torch.Tensor, views: list[Photometric]) -> torch.Tensor:
    """`[B, C, H, W]` images in [0, 1] through each one's operations (clamped to [0, 1] after every operation)."""
    out = []
    for image, view in zip(images, views):
        x = image
        for name, params in view.ops:
            x = OPERATIONS[name][1](x, params).clamp(0, 1).to(image.dtype)
        out.append(x)
    return torch.stack(out) if out else images
