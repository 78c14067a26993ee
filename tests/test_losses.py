"""The chunked, fused-gradient divergence against plain autograd in float64."""

import pytest
import torch

from vlmdistill.losses import divergence_loss, feature_loss, reference_divergence, standardize_logits


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_value_and_gradient_match_autograd(kind, temperature):
    s = torch.randn(37, 53, dtype=torch.float64, requires_grad=True)
    t = torch.randn(37, 53, dtype=torch.float64) * 2
    w = torch.rand(37, dtype=torch.float64)
    ref = (reference_divergence(s, t, kind=kind, temperature=temperature, jsd_beta=0.3) * w).sum()
    (g_ref,) = torch.autograd.grad(ref, s)

    s2 = s.detach().clone().requires_grad_(True)
    got = divergence_loss(s2, t, kind=kind, temperature=temperature, jsd_beta=0.3, weights=w, chunk_rows=8)
    got.backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s2.grad, g_ref, rtol=1e-9, atol=1e-12)


def test_chunking_does_not_change_the_result():
    s = torch.randn(100, 31, requires_grad=True)
    t = torch.randn(100, 31)
    a = divergence_loss(s, t, chunk_rows=7)
    (ga,) = torch.autograd.grad(a, s)
    b = divergence_loss(s, t, chunk_rows=1000)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_divergence_is_zero_for_equal_distributions_and_positive_otherwise():
    s = torch.randn(5, 11)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence_loss(s, s.clone(), kind=kind).abs() < 1e-5
        assert divergence_loss(s, s + torch.randn(5, 11), kind=kind) > 1e-3


def test_gradient_kept_in_student_dtype():
    s = torch.randn(6, 9, dtype=torch.bfloat16, requires_grad=True)
    loss = divergence_loss(s, torch.randn(6, 9, dtype=torch.bfloat16))
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_standardization_removes_scale_and_shift():
    s = torch.randn(4, 20, dtype=torch.float64)
    t = torch.randn(4, 20, dtype=torch.float64)
    a = reference_divergence(standardize_logits(s), standardize_logits(t))
    b = reference_divergence(standardize_logits(s), standardize_logits(3.0 * t + 7.0))
    torch.testing.assert_close(a, b)
    z = standardize_logits(t)
    torch.testing.assert_close(z.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(-1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_feature_loss_mask_normalises_over_selected_tokens():
    s = torch.randn(2, 5, 4)
    t = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    got = feature_loss(s, t, "mse", mask=mask)
    sel = mask.bool()
    torch.testing.assert_close(got, ((s[sel] - t[sel]) ** 2).mean())
    cos = feature_loss(s, s.clone(), "cosine")
    assert cos.abs() < 1e-6
    with pytest.raises(ValueError, match="mse"):
        feature_loss(s, t, "l3")


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_row_indices_equal_gathering_the_rows(kind):
    """Selecting rows by index gives the value of the gathered rows and a gradient that is zero elsewhere."""
    s = torch.randn(4, 9, 23, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, 23, dtype=torch.float64)
    s_rows = torch.tensor([0, 3, 8, 17, 35, 20])
    t_rows = torch.tensor([1, 0, 19, 4, 7, 12])
    w = torch.rand(6, dtype=torch.float64)
    flat_s = s.reshape(-1, 23)
    ref = (reference_divergence(flat_s[s_rows], t.reshape(-1, 23)[t_rows], kind=kind, temperature=2.0) * w).sum()
    (g_ref,) = torch.autograd.grad(ref, s)

    got = divergence_loss(s, t, kind=kind, temperature=2.0, weights=w, chunk_rows=4,
                          student_rows=s_rows, teacher_rows=t_rows)
    (g,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    untouched = torch.ones(36, dtype=torch.bool)
    untouched[s_rows] = False
    assert g.reshape(-1, 23)[untouched].abs().max() == 0


def test_row_indices_must_come_in_pairs():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="together"):
        divergence_loss(s, t, student_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows"):
        divergence_loss(s, t, student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0]))
