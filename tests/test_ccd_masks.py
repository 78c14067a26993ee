"""CCD character masks: k-means polarity, connected components, warping onto the irregular view."""

import numpy as np
import pytest
import torch

from vlmdistill.plugins.ccd.masks import (
    character_slots,
    fix_polarity,
    kmeans_two_clusters,
    pseudo_text_masks,
    slot_token_weights,
    warp_masks,
)
from vlmdistill.plugins.ccd.views import affine_theta, warp

H, W = 32, 128
# (top, left, height, width) of dark "characters", listed left to right
BOXES = [(8, 6, 16, 9), (6, 24, 20, 7), (10, 40, 12, 12), (7, 62, 18, 8), (9, 80, 14, 10), (8, 100, 16, 9)]


def box_image(boxes=BOXES, ink=0.1, paper=0.9) -> torch.Tensor:
    img = torch.full((1, 3, H, W), paper)
    for top, left, h, w in boxes:
        img[..., top:top + h, left:left + w] = ink
    return img


def test_kmeans_polarity_makes_text_true_for_both_contrasts():
    dark_on_light = box_image(ink=0.1, paper=0.9)
    light_on_dark = box_image(ink=0.95, paper=0.05)
    expected = torch.zeros(1, H, W, dtype=torch.bool)
    for top, left, h, w in BOXES:
        expected[:, top:top + h, left:left + w] = True
    # Raw 2-means marks the brighter cluster: the paper in the first image, the ink in the second.
    assert torch.equal(kmeans_two_clusters(dark_on_light[:, 0]), ~expected)
    assert torch.equal(kmeans_two_clusters(light_on_dark[:, 0]), expected)
    for img in (dark_on_light, light_on_dark):
        assert torch.equal(pseudo_text_masks(img), expected)


def test_polarity_needs_three_of_four_border_lines():
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[:, 0, :] = True
    mask[:, -1, :] = True  # two border lines mostly on: kept as is
    assert torch.equal(fix_polarity(mask), mask)
    mask[:, :, 0] = True  # three: this is background, invert
    assert torch.equal(fix_polarity(mask), ~mask)


def _mask_with_blobs(blobs):
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    for top, left, h, w in blobs:
        mask[:, top:top + h, left:left + w] = True
    return mask


def test_components_are_ordered_left_to_right_and_small_ones_dropped():
    blobs = [(5, 90, 10, 5), (5, 10, 10, 5), (20, 50, 5, 5), (5, 50, 6, 6)]  # third: 25 px < 30
    slots = character_slots(_mask_with_blobs(blobs), max_characters=26, min_pixels=30)
    assert slots.shape == (1, 26, H, W)
    sizes = slots.flatten(2).sum(-1)[0]
    assert sizes[:3].tolist() == [50, 36, 50] and sizes[3:].sum() == 0
    cols = [torch.nonzero(slots[0, k])[:, 1].float().mean().item() for k in range(3)]
    assert cols == sorted(cols) and cols[0] < 20 and cols[2] > 80


def test_diagonal_pixels_are_one_component_8_connected():
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    for i in range(20):  # a one-pixel diagonal stroke: only 8-connectivity joins it
        mask[0, 5 + i, 10 + i] = True
    slots = character_slots(mask, min_pixels=20)
    assert int(slots[0, 0].sum()) == 20 and int(slots[0, 1:].sum()) == 0


def test_at_most_max_characters_keeps_the_leftmost():
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    for i in range(30):  # 30 blobs of 2x16 pixels, 4 px apart
        mask[0, 8:24, 4 * i:4 * i + 2] = True
    mask[1, 8:24, 60:66] = True  # the second image is independent of the first
    slots = character_slots(mask, max_characters=26, min_pixels=30)
    assert int(slots[0].flatten(1).any(1).sum()) == 26
    assert slots[0, 25].nonzero()[:, 1].min().item() == 100  # blob 26 of 30 (x = 4*25)
    assert not slots[0, :, :, 104:].any()  # the 4 rightmost are not kept
    assert int(slots[1, 0].sum()) == 96 and not slots[1, 1:].any()


def test_empty_mask_gives_empty_slots():
    slots = character_slots(torch.zeros(3, H, W, dtype=torch.bool), max_characters=5)
    assert slots.shape == (3, 5, H, W) and not slots.any()


def _to_pixels(points_norm: np.ndarray) -> np.ndarray:
    return np.stack([(points_norm[:, 0] + 1) * W / 2 - 0.5, (points_norm[:, 1] + 1) * H / 2 - 0.5], 1)


@pytest.mark.parametrize("params", [
    dict(scale=(0.8, 0.9), rotate=6.0, shear=(25.0, -5.0), translate=(0.02, -0.02)),
    dict(scale=(0.6, 1.1), rotate=-10.0, shear=(-40.0, 8.0)),
])
def test_warped_slots_land_on_the_same_characters(params):
    """Slots of the regular view, warped with the view's matrix, cover the same characters in the irregular view."""
    image = box_image()
    theta = torch.from_numpy(affine_theta((H, W), **params)).float().unsqueeze(0)
    irregular = warp(image - 0.9, theta) + 0.9  # paper outside the frame, so only the characters are dark
    slots = character_slots(pseudo_text_masks(image), min_pixels=30)
    warped = warp_masks(slots, theta)

    # 1. every warped slot covers ink in the irregular image
    gray = irregular[0, 0]
    for k in range(len(BOXES)):
        covered = gray[warped[0, k]]
        assert covered.numel() > 20 and (covered < 0.5).float().mean() > 0.8, k
    # 2. its centroid is where the matrix sends the character's centre (theta maps irregular -> regular)
    inverse = np.linalg.inv(theta[0].double().numpy())
    for k, (top, left, h, w) in enumerate(BOXES):
        centre = np.array([[left + (w - 1) / 2, top + (h - 1) / 2]])
        norm = np.stack([(2 * centre[:, 0] + 1) / W - 1, (2 * centre[:, 1] + 1) / H - 1, np.ones(1)], 1)
        expected = _to_pixels((inverse @ norm.T).T)[0]
        ys, xs = torch.nonzero(warped[0, k], as_tuple=True)
        assert abs(xs.float().mean().item() - expected[0]) < 1.5 and abs(ys.float().mean().item() - expected[1]) < 1.5
    # 3. the irregular view's own components match the warped slots one to one, in the same order
    own = character_slots(pseudo_text_masks(irregular), min_pixels=10)
    for k in range(len(BOXES)):
        inter = (own[0, k] & warped[0, k]).sum().item()
        union = (own[0, k] | warped[0, k]).sum().item()
        assert inter / union > 0.6, (k, inter, union)


def test_identity_matrix_leaves_masks_unchanged():
    slots = character_slots(pseudo_text_masks(box_image()))
    assert torch.equal(warp_masks(slots, torch.eye(3).unsqueeze(0)), slots)


def test_slot_token_weights_average_over_covered_patches():
    slots = torch.zeros(1, 2, H, W, dtype=torch.bool)
    slots[0, 0, 0:4, 0:8] = True  # exactly two 4x4 patches
    slots[0, 0, 4:6, 8:12] = True  # half a patch
    weights, present = slot_token_weights(slots, (8, 32))
    assert present.tolist() == [[True, False]]
    w = weights[0, 0].view(8, 32)
    assert torch.allclose(weights[0, 0].sum(), torch.tensor(1.0))
    assert torch.allclose(w[0, 0], w[0, 1]) and torch.allclose(w[1, 2], w[0, 0] / 2)
    assert weights[0, 1].abs().sum() == 0
