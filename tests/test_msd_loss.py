"""The msd loss: ALBEF's soft-target contrastive loss against teacher keys, checked against float64 references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from contract_cases.msd import collate, examples, tiny_clip

import vlmdistill
from vlmdistill.errors import ConfigError, UnsupportedModelError
from vlmdistill.plugins.msd.losses import momentum_contrastive_rows


def _reference_rows(v, t, image_keys, text_keys, positives, alpha, scale):
    """Row by row, written from the definition (no shared code with the plugin)."""
    i2t, t2i = [], []
    for row, pos in enumerate(positives.tolist()):
        for query, keys, teacher_query, out in ((v[row], text_keys, image_keys[pos], i2t),
                                                (t[row], image_keys, text_keys[pos], t2i)):
            teacher = torch.softmax(keys @ teacher_query * float(scale.detach()), dim=0)  # a constant target
            target = alpha * teacher
            target[pos] += 1.0 - alpha
            out.append(-(target * torch.log_softmax(keys @ query * scale, dim=0)).sum())
    return torch.stack(i2t), torch.stack(t2i)


def test_rows_match_float64_reference_with_queue_and_soft_targets():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    v = unit(3, 8).requires_grad_()
    t = unit(3, 8).requires_grad_()
    image_keys, text_keys = unit(10, 8), unit(10, 8)   # 6 macro-batch rows + 4 queued
    positives = torch.tensor([2, 3, 4])
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    got = momentum_contrastive_rows(v, t, image_keys, text_keys, positives, alpha=0.4, logit_scale=scale)
    want = _reference_rows(v, t, image_keys, text_keys, positives, 0.4, scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_got = torch.autograd.grad(sum(x.sum() for x in got), (v, t, scale))
    grads_want = torch.autograd.grad(sum(x.sum() for x in want), (v, t, scale))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_targets_carry_no_gradient_into_the_scale():
    """The teacher's softmax uses tau but is a constant target: only the student logits reach logit_scale."""
    keys = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    q = keys[:2].clone()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    rows = momentum_contrastive_rows(q, q, keys, keys, torch.tensor([0, 1]), alpha=1.0, logit_scale=scale)
    (grad,) = torch.autograd.grad(sum(r.sum() for r in rows), scale)
    with torch.no_grad():
        target = torch.softmax(q @ keys.T * 5.0, -1)
    s = scale.detach().clone().requires_grad_()
    ref = -(target * torch.log_softmax(q @ keys.T * s, -1)).sum() * 2
    torch.testing.assert_close(grad, torch.autograd.grad(ref, s)[0])


def _double_clip():
    return tiny_clip().double()


def _batch(n, seed=3):
    b = collate(examples(n, seed))
    b["pixel_values"] = b["pixel_values"].double()
    return b


def test_alpha0_no_queue_equals_clip_infonce():
    """α = 0, K = 0, teacher = student (step 0): the loss is CLIP's own InfoNCE, and the gradient is that of
    InfoNCE with the keys held fixed (the keys are the teacher's)."""
    student = _double_clip()
    batch = _batch(6)
    with torch.no_grad():
        clip_loss = copy.deepcopy(student)(**batch, return_loss=True).loss
    reference = copy.deepcopy(student)
    wrapped = vlmdistill.wrap(student, plugin="msd", alpha=0.0, queue_size=0)
    wrapped.train()
    loss = wrapped(**batch).loss
    torch.testing.assert_close(loss, clip_loss, rtol=1e-12, atol=1e-12)
    loss.backward()

    out = reference(**batch)
    v, t = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
    scale = reference.logit_scale.exp()
    labels = torch.arange(6)
    ref = 0.5 * (F.cross_entropy(v @ t.detach().T * scale, labels) + F.cross_entropy(t @ v.detach().T * scale, labels))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    ref_grads = dict(reference.named_parameters())
    checked = 0
    for name, p in student.named_parameters():
        if ref_grads[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        # (0-dim parameters such as logit_scale are 1-element tensors while wrapped)
        torch.testing.assert_close(p.grad.reshape(ref_grads[name].grad.shape), ref_grads[name].grad, rtol=1e-9,
                                   atol=1e-12, msg=name)
        checked += 1
    assert checked > 10


def test_alpha_warmup_is_linear_in_optimizer_steps():
    wrapped = vlmdistill.wrap(tiny_clip(), plugin="msd", alpha=0.4, alpha_warmup_steps=4, queue_size=0)
    plugin = wrapped.plugin
    seen = []
    for _ in range(6):
        seen.append(plugin.current_alpha())
        wrapped.step_end()
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    no_warmup = vlmdistill.wrap(tiny_clip(), plugin="msd", alpha=0.3, alpha_warmup_steps=0)
    assert no_warmup.plugin.current_alpha() == 0.3


def test_loss_is_linear_in_alpha_between_hard_and_teacher_targets():
    """targets = α·teacher + (1 − α)·one-hot, so L(α) = (1 − α)·L(0) + α·L(1), and L(1) ≠ L(0)."""
    batch = _batch(4)
    losses = {}
    for alpha in (0.0, 0.4, 1.0):
        wrapped = vlmdistill.wrap(_double_clip(), plugin="msd", alpha=alpha, alpha_warmup_steps=0, queue_size=0)
        wrapped.train()
        losses[alpha] = float(wrapped(**batch).loss.detach())
    assert abs(losses[1.0] - losses[0.0]) > 1e-3
    assert losses[0.4] == pytest.approx(0.6 * losses[0.0] + 0.4 * losses[1.0], rel=1e-12)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="image_embeds_module"):
        vlmdistill.wrap(tiny_clip(), plugin="msd", image_embeds_module="visual_projection")
    with pytest.raises(ConfigError, match="temperature"):
        vlmdistill.wrap(tiny_clip(), plugin="msd", temperature=0.9)
    with pytest.raises(ConfigError, match="builds its own teacher"):
        vlmdistill.wrap(tiny_clip(), plugin="msd", teacher=tiny_clip())


def test_refuses_a_model_that_is_not_a_dual_encoder():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match="dual encoder"):
        vlmdistill.wrap(lm, plugin="msd")
