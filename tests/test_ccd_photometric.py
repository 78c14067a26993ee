"""CCD's photometric pipeline: the reference's stages and their probabilities, and what each operation does."""

import collections

import numpy as np
import pytest
import torch

from vlmdistill.plugins.ccd.photometric import (ARITHMETIC, BLURS, COLOUR, CONTRAST, OPERATIONS, WEATHER,
                                                Photometric, apply_photometric, sample_photometric)
from vlmdistill.data.rendered_words import render_words


@pytest.fixture(scope="module")
def word():
    return torch.from_numpy(render_words(["glyph"], 3)).permute(0, 3, 1, 2).float() / 255


def _apply(word, name, **params):
    sample = OPERATIONS[name][0](np.random.default_rng(0))
    return apply_photometric(word, [Photometric([(name, {**sample, **params})])])


def test_stages_have_the_reference_operations():
    # augmentation_pipelines.py, severity 5: 21 arithmetic, 9 colour, sharpen + 5 blurs, 8 contrast, 4 weather
    assert (len(ARITHMETIC), len(COLOUR), len(BLURS), len(CONTRAST), len(WEATHER)) == (21, 9, 5, 8, 4)
    assert len(OPERATIONS) == 48


def test_stage_probabilities():
    rng = np.random.default_rng(0)
    views = [sample_photometric(rng, 0.2, 0.7) for _ in range(4000)]
    augmented = [v for v in views if v.ops]
    assert len(augmented) / len(views) == pytest.approx(0.8, abs=0.03)
    stage_of = {name: stage for stage, ops in (("arithmetic", ARITHMETIC), ("colour", COLOUR), ("blur", BLURS),
                                               ("contrast", CONTRAST), ("weather", WEATHER))
                for name, _, _ in ops}
    stage_of["sharpen"] = "blur"
    counts = collections.Counter(stage_of[name] for v in augmented for name, _ in v.ops)
    assert counts["arithmetic"] == len(augmented)     # always one of the 21, never gated
    for stage in ("colour", "blur", "contrast", "weather"):
        assert counts[stage] / len(augmented) == pytest.approx(0.7, abs=0.03), stage
    blurs = [name for v in augmented for name, _ in v.ops if stage_of[name] == "blur"]
    assert blurs.count("sharpen") / len(blurs) == pytest.approx(0.5, abs=0.04)
    assert len({name for v in augmented for name, _ in v.ops}) == 48   # every operation is drawn
    assert all(not v.ops for v in (sample_photometric(rng, 0.2, 0.7, enabled=False) for _ in range(10)))


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_operation_changes_the_image_within_range_and_repeats(word, name):
    forced = {"invert": {"apply": True}, "solarize": {"apply": True, "threshold": 0.3}}.get(name, {})
    out = _apply(word, name, **forced)
    assert out.shape == word.shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert (out - word).abs().mean() > 1e-3, name
    assert torch.equal(out, _apply(word, name, **forced))   # the view's seed decides everything


def test_operations_do_what_their_names_say(word):
    torch.testing.assert_close(_apply(word, "invert", apply=True), 1 - word)
    grey = _apply(word, "grayscale", alpha=1.0)[0]
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)
    assert _apply(word, "uniform_quantize", colours=4)[0, 0].unique().numel() <= 4
    colours = _apply(word, "kmeans_quantize", colours=3)[0].reshape(3, -1).T.unique(dim=0)
    assert colours.shape[0] <= 3
    kept = _apply(word, "dropout2d")[0].flatten(1).abs().sum(1) > 0
    assert kept.any()
    torch.testing.assert_close(_apply(word, "gamma_contrast", gamma=2.0), word ** 2)
    torch.testing.assert_close(_apply(word, "sigmoid_contrast", gain=5.0, cutoff=0.5), torch.sigmoid(5 * (word - 0.5)))
    neutral = _apply(word, "colour_temperature", kelvin=6600.0)   # about the white point of daylight
    assert (neutral - word).abs().max() < 0.03
    skewed = torch.rand(1, 3, 32, 128, generator=torch.Generator().manual_seed(1)) ** 4   # mostly dark
    equalised = _apply(skewed, "all_channels_histogram_equalisation")
    assert skewed.median() < 0.1 and equalised.median() > 0.3   # the dark levels are spread out


def test_a_view_is_the_same_in_any_batch(word):
    rng = np.random.default_rng(5)
    views = [sample_photometric(rng, 0.2, 0.7) for _ in range(6)]
    images = torch.rand(6, 3, 32, 128, generator=torch.Generator().manual_seed(0))
    batch = apply_photometric(images, views)
    assert torch.equal(batch[2:5], apply_photometric(images[2:5], views[2:5]))
