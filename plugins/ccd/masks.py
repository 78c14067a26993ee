"""Character masks: k-means pseudo text masks, connected components into ordered character slots, and the
token weights that pool a character's feature from the patch tokens."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .views import warp

# 8-connectivity inside each image, none across the batch axis: one `ndimage.label` call labels a whole batch.
_BATCH_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_BATCH_8_CONNECTED[1] = True


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` in [0, 1] -> `[B, H, W]` luma (ITU-R 601 weights, as PIL's "L")."""
    if images.shape[1] == 1:
        return images[:, 0]
    return 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]


def kmeans_two_clusters(gray: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Per-image 2-means on 8-bit grey levels. Returns `[B, H, W]` bool: True = the brighter cluster.

    Lloyd's iterations run on each image's 256-bin histogram (exactly k-means on the quantised pixels, as on a
    PIL "L" image), so the cost is one histogram per image instead of a pass over the pixels per iteration.
    """
    b = gray.shape[0]
    levels8 = gray.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy().reshape(b, -1)
    hist = np.bincount((np.arange(b)[:, None] * 256 + levels8).ravel(), minlength=b * 256).reshape(b, 256)
    hist = hist.astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    used = hist > 0
    low = np.argmax(used, axis=1).astype(np.float64)
    high = (255 - np.argmax(used[:, ::-1], axis=1)).astype(np.float64)
    count, total = hist.sum(1), (hist * levels).sum(1)
    for _ in range(iterations):
        bright = levels[None, :] > (low + high)[:, None] / 2  # strictly nearer the bright centre
        n_bright = (hist * bright).sum(1)
        s_bright = (hist * bright * levels).sum(1)
        new_high = np.where(n_bright > 0, s_bright / np.maximum(n_bright, 1), high)
        new_low = np.where(count - n_bright > 0, (total - s_bright) / np.maximum(count - n_bright, 1), low)
        if np.array_equal(new_high, high) and np.array_equal(new_low, low):
            break
        low, high = new_low, new_high
    mask = levels8 > ((low + high) / 2)[:, None]
    return torch.from_numpy(mask).view(gray.shape).to(gray.device)


def fix_polarity(mask: torch.Tensor) -> torch.Tensor:
    """Make text = True: if at least 3 of the 4 border lines are mostly True, the mask is background; invert it."""
    _, h, w = mask.shape
    m = mask.to(torch.int64)
    votes = ((m[:, 0, :].sum(1) > w // 2).long() + (m[:, -1, :].sum(1) > w // 2).long()
             + (m[:, :, 0].sum(1) > h // 2).long() + (m[:, :, -1].sum(1) > h // 2).long())
    return torch.where((votes >= 3).view(-1, 1, 1), ~mask, mask)


def pseudo_text_masks(images: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """k-means (k=2) text masks of `[B, C, H, W]` images in [0, 1], text = True."""
    return fix_polarity(kmeans_two_clusters(grayscale(images), iterations))


def character_slots(text_masks: torch.Tensor, max_characters: int = 26, min_pixels: int = 30) -> torch.Tensor:
    """Connected components (8-connected) of `[B, H, W]` text masks -> `[B, K, H, W]` bool slot masks.

    Components smaller than `min_pixels` are dropped; the `max_characters` leftmost ones (by centroid column)
    fill the slots left to right; unused slots are empty.
    """
    b, h, w = text_masks.shape
    masks = text_masks.detach().to("cpu", torch.bool).numpy()
    labels, count = ndimage.label(masks, structure=_BATCH_8_CONNECTED)
    slots = np.zeros((b, h, w), dtype=np.int64)  # slot index + 1, 0 = none
    if count:
        flat = labels.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        cols = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), b * h), minlength=count + 1)
        # A component lies in one image, so the mean image index of its pixels is that index, exactly.
        images = np.bincount(flat, weights=np.repeat(np.arange(b, dtype=np.float64), h * w), minlength=count + 1)
        ids = np.nonzero(sizes[1:] >= min_pixels)[0] + 1
        if ids.size:
            image_of = np.rint(images[ids] / sizes[ids]).astype(np.int64)
            centroid = cols[ids] / sizes[ids]
            order = np.lexsort((centroid, image_of))
            ids, image_of = ids[order], image_of[order]
            starts = np.searchsorted(image_of, image_of, side="left")
            rank = np.arange(ids.size) - starts
            keep = rank < max_characters
            lut = np.zeros(count + 1, dtype=np.int64)
            lut[ids[keep]] = rank[keep] + 1
            slots = lut[labels]
    slot_index = torch.from_numpy(slots).to(text_masks.device)
    ks = torch.arange(1, max_characters + 1, device=text_masks.device).view(1, -1, 1, 1)
    return slot_index.unsqueeze(1) == ks


def warp_masks(masks: torch.Tensor, theta: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Warp `[B, K, H, W]` (or `[B, H, W]`) regular-view masks onto the irregular view (bilinear, > threshold)."""
    squeeze = masks.dim() == 3
    m = masks.unsqueeze(1) if squeeze else masks
    out = warp(m.float(), theta) > threshold
    return out.squeeze(1) if squeeze else out


def slot_token_weights(slots: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-downsample `[B, K, H, W]` slot masks to the token grid and normalise each by its mass.

    Returns (`[B, K, gh*gw]` weights that sum to 1 per non-empty slot, `[B, K]` bool: slot non-empty).
    """
    b, k = slots.shape[:2]
    cover = F.interpolate(slots.float(), size=grid, mode="area").flatten(2)
    mass = cover.sum(-1)
    present = mass > 0
    return cover / mass.clamp_min(1e-12).unsqueeze(-1), present


def slice_token_weights(batch: int, grid: tuple[int, int], slices: int, device=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights of `slices` vertical strips of equal width (full height), left to right: the instances of
    sequence-level self-supervision. Returns (`[B, slices, gh*gw]` weights summing to 1, `[B, slices]` all True)."""
    gh, gw = grid
    if slices > gw:
        raise ValueError(f"{slices} slices of a token grid {gw} columns wide")
    column = torch.arange(gw, device=device) * slices // gw                     # strip of each column
    strips = (column.view(1, 1, gw) == torch.arange(slices, device=device).view(-1, 1, 1)).expand(slices, gh, gw)
    weights = strips.float().flatten(1)
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights.unsqueeze(0).expand(batch, -1, -1),
            torch.ones(batch, slices, dtype=torch.bool, device=device))


def pool_characters(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mask-weighted average of patch tokens: `[B, N, E]`, `[B, K, N]` -> `[B, K, E]`."""
    return torch.bmm(weights.to(tokens.dtype), tokens)
