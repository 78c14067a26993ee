"""The CCD miniature: rendered ground truth, its metrics, and a smoke run."""

import json

import numpy as np
import pytest
import torch

from vlmdistill.eval.experiments.ccd_glyphs import LETTERS, box_masks, glyph_strings
from vlmdistill.eval.experiments.ccd_miniature import iou, paired_t


def test_rendered_ground_truth_matches_the_image():
    data = glyph_strings(12, 0)
    images, masks = data["images"].astype(np.float64), data["masks"]
    assert images.shape == (12, 32, 128, 3) and masks.shape == (12, 32, 128)
    for i, (word, boxes) in enumerate(zip(data["words"], data["boxes"])):
        assert 3 <= len(word) <= 6 and set(word) <= set(LETTERS) and boxes.shape == (len(word), 4)
        assert (np.diff(boxes[:, 0]) > 0).all()                    # left to right
        inside = box_masks([boxes], 6)[0].any(0)
        assert (masks[i] & ~inside).sum() <= 0.02 * masks[i].sum()  # text lies in the character boxes
        ink, paper = images[i][masks[i]].mean(0), images[i][~inside].mean(0)
        assert np.abs(ink - paper).max() > 40                        # the mask marks the ink, not the background
    again = glyph_strings(12, 0)
    assert again["words"] == data["words"] and np.array_equal(again["images"], data["images"])


def test_iou_and_paired_t_against_hand_values():
    a = torch.zeros(2, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, dtype=torch.bool)
    a[0, :3] = True
    b[0, 1:] = True
    b[1, 0] = True
    assert iou(a, b) == pytest.approx(2 / 5)                       # |{1, 2}| / |{0, 1, 2, 3} ∪ {(1, 0)}|
    result = paired_t([0.5, 0.7, 0.6], [0.4, 0.5, 0.5])            # differences 0.1, 0.2, 0.1
    d_mean, d_sd = 0.4 / 3, np.std([0.1, 0.2, 0.1], ddof=1)
    assert result["mean_difference"] == pytest.approx(d_mean)
    assert result["t"] == pytest.approx(d_mean / (d_sd / np.sqrt(3)))


@pytest.mark.slow
def test_miniature_quick_run_writes_results(tmp_path):
    from vlmdistill.eval.experiments.ccd_miniature import main

    assert main(["--quick", "--seeds", "0", "1", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["runs"]) == 2 and result["pseudo_mask_iou"] > 0.8
    for row in result["runs"]:
        assert all(0 <= row[f"{arm}/seg_iou"] <= 1 for arm in ("slices", "ccd"))
        assert all(row[f"{arm}/teacher_mean_entropy"] > 0 for arm in ("slices", "ccd"))
        assert row["ccd/log"][-1]["distill/teacher_entropy"] > 0
    assert set(result["summary"]["character probe (GT boxes)"]) >= {"scratch", "slices", "ccd", "ccd - slices"}
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
