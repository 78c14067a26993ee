"""CCD views: deterministic per sample, and the matrix describes the warp."""

import numpy as np
import torch

from vlmdistill.plugins.ccd.config import ViewConfig
from vlmdistill.plugins.ccd.views import affine_theta, content_ids, make_views, sample_seeds, warp


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 128, generator=g)


def test_views_of_a_sample_do_not_depend_on_its_batch():
    images = _images(6)
    seeds = [11, 12, 13, 14, 15, 16]
    big = make_views(images, seeds, ViewConfig())
    part = make_views(images[3:5], seeds[3:5], ViewConfig())
    for name in ("regular", "irregular", "theta", "warped"):
        assert torch.equal(getattr(big, name)[3:5], getattr(part, name)), name


def test_views_change_with_the_seed_and_repeat_with_it():
    images = _images(8)
    a = make_views(images, list(range(8)), ViewConfig())
    b = make_views(images, list(range(8)), ViewConfig())
    c = make_views(images, list(range(100, 108)), ViewConfig())
    assert torch.equal(a.irregular, b.irregular) and torch.equal(a.regular, b.regular)
    assert not torch.equal(a.irregular, c.irregular)


def test_affine_probability_and_identity_branch():
    images = _images(64)
    never = make_views(images, list(range(64)), ViewConfig(affine_probability=0.0))
    assert not never.warped.any()
    assert torch.equal(never.theta, torch.eye(3).expand(64, 3, 3))
    assert torch.equal(never.irregular, images)  # the un-augmented image
    always = make_views(images, list(range(64)), ViewConfig(affine_probability=1.0))
    assert always.warped.all()
    default = make_views(images, list(range(64)), ViewConfig())
    assert 0.45 < default.warped.float().mean().item() < 0.95  # p = 0.7


def test_regular_view_keeps_the_geometry():
    images = torch.zeros(4, 3, 32, 128)
    images[:, :, 10:20, 30:40] = 1.0
    views = make_views(images, [1, 2, 3, 4], ViewConfig(photometric=False))
    assert torch.equal(views.regular, images)


def test_theta_maps_irregular_points_back_to_regular_points():
    """A bright pixel moved by the pixel-space map appears where the forward map sends it."""
    h, w = 32, 128
    theta = affine_theta((h, w), scale=(0.8, 1.0), rotate=8.0, shear=(20.0, 0.0), translate=(0.02, 0.0))
    image = torch.zeros(1, 1, h, w)
    image[0, 0, 12:16, 40:44] = 1.0  # centre (41.5, 13.5) in pixels
    moved = warp(image, torch.from_numpy(theta).float().unsqueeze(0))[0, 0]
    ys, xs = torch.nonzero(moved > 0.5, as_tuple=True)
    # forward map in centred pixel coordinates: p' = R·Sh·S·p + t
    a = np.deg2rad(8.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    shear = np.array([[1.0, np.tan(np.deg2rad(20.0))], [0.0, 1.0]])
    centred = np.array([41.5 - (w - 1) / 2, 13.5 - (h - 1) / 2])
    target = rot @ shear @ np.diag([0.8, 1.0]) @ centred + np.array([0.02 * w, 0.0])
    target += np.array([(w - 1) / 2, (h - 1) / 2])
    assert abs(xs.float().mean().item() - target[0]) < 0.75
    assert abs(ys.float().mean().item() - target[1]) < 0.75


def test_rotation_is_rigid_in_pixels_on_a_wide_image():
    theta = affine_theta((32, 128), rotate=90.0)
    # A pixel-space rotation by 90° turns a horizontal unit step into a vertical one of the same pixel length.
    norm = np.diag([2 / 128, 2 / 32, 1.0])
    pixel_map = np.linalg.inv(norm) @ np.linalg.inv(theta) @ norm  # regular -> irregular, centred pixels
    assert np.allclose(pixel_map[:2, :2], [[0, -1], [1, 0]], atol=1e-9)


def test_sample_seeds_come_from_ids_step_and_base_seed():
    pixels = _images(3)
    ids = torch.tensor([5, 6, 7])
    a = sample_seeds(pixels, ids, step=0, base_seed=0)
    assert a == sample_seeds(pixels.flip(0), ids, step=0, base_seed=0)  # ids, not content, decide
    assert a != sample_seeds(pixels, ids, step=1, base_seed=0)
    assert a != sample_seeds(pixels, ids, step=0, base_seed=1)
    assert len(set(a)) == 3


def test_content_ids_are_exact_per_sample():
    pixels = torch.randn(5, 3, 32, 128)
    ids = content_ids(pixels)
    assert ids.dtype == torch.int64
    assert torch.equal(ids[2:4], content_ids(pixels[2:4]))
    assert sample_seeds(pixels, None, 0, 0)[1:3] == sample_seeds(pixels[1:3], None, 0, 0)
