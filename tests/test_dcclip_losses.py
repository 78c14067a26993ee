"""dcclip losses against plain-torch references, and the zero-loss property of stage 1."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmdistill
from vlmdistill.plugins.dcclip.losses import (align_maps, embedding_loss, image_map_loss, symmetric_info_nce,
                                              text_token_loss)
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch


@pytest.mark.parametrize("adapter_kind", ["conv", "linear"])
@pytest.mark.parametrize("kind", ["smooth_l1", "mse", "cosine"])
def test_image_loss_is_zero_when_teacher_equals_adapted_student(adapter_kind, kind):
    torch.manual_seed(0)
    adapter = nn.Conv2d(8, 12, 1) if adapter_kind == "conv" else nn.Linear(8, 12)
    student = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        channels_last = student.permute(0, 2, 3, 1)
        teacher = adapter(student) if adapter_kind == "conv" else adapter(channels_last).permute(0, 3, 1, 2)
    loss = image_map_loss(student, teacher, adapter, kind=kind)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-6, rtol=0)
    # ...and clearly not zero once the teacher moves
    assert float(image_map_loss(student, teacher + 0.5, adapter, kind="smooth_l1").detach().min()) > 0.05


def test_text_loss_is_zero_when_teacher_equals_adapted_student_on_valid_tokens():
    torch.manual_seed(0)
    adapter = nn.Linear(8, 6)
    student = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        teacher = adapter(student)
        teacher[0, 3:] += 100.0  # padding positions must not count
    loss = text_token_loss(student, teacher, mask, adapter, kind="smooth_l1")
    torch.testing.assert_close(loss, torch.zeros(2), atol=1e-6, rtol=0)


def test_image_loss_matches_reference_with_interpolation_and_pooling():
    torch.manual_seed(1)
    adapter = nn.Conv2d(6, 10, 1)
    student, teacher = torch.randn(2, 6, 3, 3), torch.randn(2, 10, 6, 6)
    got = image_map_loss(student, teacher, adapter, kind="smooth_l1", beta=0.5, align="interpolate")
    up = F.interpolate(adapter(student), size=(6, 6), mode="bilinear", align_corners=False)
    ref = F.smooth_l1_loss(up, teacher, reduction="none", beta=0.5).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, ref)
    got = image_map_loss(student, teacher, adapter, kind="mse", align="pool")
    pooled = F.avg_pool2d(teacher, 2)  # 6x6 -> 3x3: adaptive pooling equals 2x2 average pooling here
    ref = (adapter(student) - pooled).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, ref)


def test_align_maps_leaves_equal_grids_alone():
    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)
    s, t = align_maps(a, b, "interpolate")
    assert s is a and t is b


@pytest.mark.parametrize("normalisation", ["per_sample", "per_token"])
def test_text_loss_matches_masked_reference(normalisation):
    torch.manual_seed(2)
    adapter = nn.Linear(4, 7)
    student, teacher = torch.randn(3, 6, 4), torch.randn(3, 6, 7)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    got = text_token_loss(student, teacher, mask, adapter, kind="smooth_l1", normalisation=normalisation)
    per = F.smooth_l1_loss(adapter(student), teacher, reduction="none").mean(-1)
    if normalisation == "per_sample":
        ref = torch.stack([per[i][mask[i]].mean() for i in range(3)])
    else:
        ref = per[mask].mean().reshape(1)
    torch.testing.assert_close(got, ref)


def test_embedding_loss_cosine_reference():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(embedding_loss(s, t, None, kind="cosine"), 1 - F.cosine_similarity(s, t, dim=-1))


def test_symmetric_info_nce_matches_reference_and_clamps_the_scale():
    torch.manual_seed(3)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    got = symmetric_info_nce(img, txt, scale)
    logits = (1 / 0.07) * img @ txt.T
    labels = torch.arange(5)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(got, ref)
    big = torch.tensor(math.log(1000.0), requires_grad=True)
    clamped = symmetric_info_nce(img, txt, big, max_scale=100.0)
    logits = 100.0 * img @ txt.T
    torch.testing.assert_close(clamped, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    clamped.backward()
    assert float(big.grad) == 0.0  # beyond the clamp the scale gets no gradient


def test_stage1_loss_is_zero_for_a_copy_of_the_teacher_with_identity_adapters():
    """Plugin level: when the student *is* (a copy of) the teacher and every adapter is the identity,
    the student features equal the adapted teacher features, so every stage-1 term is exactly 0."""
    teacher = tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=3)
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=3)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, embedding_weight=1.0)
    with torch.no_grad():
        for adapter in wrapped.plugin.adapters.values():
            weight = adapter.weight
            weight.zero_()
            weight.view(weight.shape[0], weight.shape[1]).copy_(torch.eye(weight.shape[0]))
            if adapter.bias is not None:
                adapter.bias.zero_()
    batch = {**token_batch(3, seed=1), "pixel_values": torch.randn(3, 3, 32, 32)}
    assert set(wrapped.plugin.adapters) == {"image", "text"}  # equal embedding widths: no embedding adapter
    out = wrapped(**batch)
    assert set(out.loss_terms) == {"image", "text", "image_embed", "text_embed"}
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in out.loss_terms.values())
    # A different student gives a clearly positive loss through the same path.
    other = vlmdistill.wrap(tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=4), plugin="dcclip",
                            teacher=teacher, embedding_weight=1.0)
    assert float(other(**batch).loss.detach()) > 0.1


def test_stage1_embedding_terms_are_zero_for_a_copy_of_the_teacher():
    teacher = tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=3)
    student = tiny_hf_clip(hidden=16, layers=1, patch=8, projection=16, seed=3)
    wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, embedding_weight=1.0, image_weight=0.0,
                              text_weight=0.0)
    batch = {**token_batch(3, seed=1), "pixel_values": torch.randn(3, 3, 32, 32)}
    out = wrapped(**batch)
    assert set(out.loss_terms) == {"image_embed", "text_embed"}
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-6)
