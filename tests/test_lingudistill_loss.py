"""LinguDistill's loss: selection per sample, CE/KD mixing, divergences, vocabulary slicing, gradient paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from contract_cases.lingudistill import VOCAB, collate, independent_teacher, tiny_llava, vlm_example

import vlmdistill
from vlmdistill.errors import ConfigError
from vlmdistill.losses import reference_divergence

F64 = dict(rtol=1e-9, atol=1e-10)


def _batch(n=2, seed=0, images=True):
    g = torch.Generator().manual_seed(seed)
    examples = [vlm_example("llava", g, image_at=2 + i if images else None, length=14) for i in range(n)]
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in collate(examples).items()}


def _models(seed=1, **text):
    student = tiny_llava(seed=seed, dtype=torch.float64, **text)
    return student, independent_teacher(student)


def _plain_ce_sum(student, batch):
    """Σ next-token CE of the plain student over the supervised tokens of each sample."""
    with torch.no_grad():
        logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(1)


def test_unselected_samples_give_exactly_the_plain_task_loss():
    student, teacher = _models()
    batch = _batch()
    with torch.no_grad():
        plain = student(**batch).loss
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
    calls = []
    teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    out = wrapped(**batch, kd_mask=torch.tensor([0, 0]))
    torch.testing.assert_close(out.loss, plain.double(), rtol=1e-6, atol=0)  # transformers' loss runs in fp32
    ce = _plain_ce_sum(student, batch)
    torch.testing.assert_close(out.loss, ce.sum() / int((batch["labels"][:, 1:] != -100).sum()), **F64)
    assert float(out.loss_terms["kd"]) == 0.0 and not calls  # the teacher does not even run


def test_mixed_batch_adds_kd_only_to_selected_samples():
    """kd_mask [1, 0]: L·N = (1-α)·CE_0 + α·KD_0 + CE_1, with the window count N as denominator."""
    alpha = 0.3
    student, teacher = _models()
    batch = _batch()
    ce = _plain_ce_sum(student, batch)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, alpha=alpha)
    out = wrapped(**batch, kd_mask=torch.tensor([1, 0]), num_items_in_batch=n_items)
    paired = wrapped.plugin.paired_logits(student, {**batch, "kd_mask": torch.tensor([1, 0])})
    assert set(paired["rows"][:, 0].tolist()) == {0}
    kd_0 = reference_divergence(paired["student"], paired["teacher"]).sum()
    expected = ((1 - alpha) * ce[0] + alpha * kd_0 + ce[1]) / n_items
    torch.testing.assert_close(out.loss, expected, **F64)
    torch.testing.assert_close(out.loss_terms["kd"], kd_0 / n_items, **F64)
    torch.testing.assert_close(out.loss_terms["task"], ce.sum() / n_items, **F64)


def test_unselected_sample_gradient_is_its_plain_ce_gradient():
    """The gradient of a batch [selected, unselected] minus that of the selected sample alone (same
    denominator) is the plain CE gradient of the unselected sample."""
    student, teacher = _models()
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)

    def grads(b, **extra):
        student.zero_grad()
        wrapped(**b, num_items_in_batch=n, **extra).loss.backward()
        return {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}

    both = grads(batch, kd_mask=torch.tensor([1, 0]))
    first = grads({k: v[:1] for k, v in batch.items()}, kd_mask=torch.tensor([1]))
    vlmdistill.unwrap(wrapped)
    student.zero_grad()
    second = {k: v[1:] for k, v in batch.items()}
    logits = student(**{k: v for k, v in second.items() if k != "labels"}).logits  # fp64 CE as reference
    (F.cross_entropy(logits[0, :-1], second["labels"][0, 1:], ignore_index=-100, reduction="sum") / n).backward()
    for name, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(both[name] - first[name], p.grad, rtol=1e-7, atol=1e-11, msg=name)


def test_dataset_categories_select_samples():
    student, teacher = _models()
    batch = _batch(3)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher,
                              dataset_categories={"coco": "captioning", "docvqa": "documents", "sciqa": "knowledge"})
    rows = wrapped.plugin.paired_logits(student, {**batch, "dataset": ["coco", "docvqa", "sciqa"]})["rows"]
    assert set(rows[:, 0].tolist()) == {0, 2}
    # An explicit kd_mask decides over the table.
    rows = wrapped.plugin.paired_logits(student, {**batch, "dataset": ["coco", "docvqa", "sciqa"],
                                                  "kd_mask": torch.tensor([0, 1, 0])})["rows"]
    assert set(rows[:, 0].tolist()) == {1}
    with pytest.raises(ConfigError, match="'laion' is not in dataset_categories"):
        wrapped(**batch, dataset=["coco", "laion", "sciqa"])


@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 0.5)])
def test_kd_term_matches_the_reference_divergence(divergence, temperature):
    student, teacher = _models()
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, divergence=divergence,
                              temperature=temperature, chunk_rows=3)  # several chunks
    out = wrapped(**batch)
    paired = wrapped.plugin.paired_logits(student, batch)
    expected = reference_divergence(paired["student"], paired["teacher"], kind=divergence,
                                    temperature=temperature).sum() / n
    assert float(expected) > 1e-4
    torch.testing.assert_close(out.loss_terms["kd"], expected, **F64)


def test_student_vocabulary_is_sliced_to_the_teachers():
    """A student with 8 extra (image) tokens: KD over the first 72 ids, each side renormalised there."""
    student = tiny_llava(seed=1, dtype=torch.float64)
    from contract_cases.lingudistill import language_model_copy
    from transformers import LlamaConfig, LlamaForCausalLM

    base = language_model_copy(student)
    cfg = LlamaConfig(**{**base.config.to_dict(), "vocab_size": 72})
    teacher = LlamaForCausalLM(cfg).double()
    with pytest.raises(vlmdistill.IncompatibleTeacherError, match="student 80 vs teacher 72"):
        vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, trust_vocab_prefix=True)
    batch = _batch()
    batch["input_ids"][0, -3] = 75  # a student-only token in the text: the teacher cannot read it
    out = wrapped(**batch)
    paired = wrapped.plugin.paired_logits(student, batch)
    assert paired["teacher"].shape[1] == paired["student"].shape[1] == 72
    assert [0, 11] not in paired["rows"].tolist() and [0, 10] in paired["rows"].tolist()  # 75 sits at 11
    with torch.no_grad():
        full = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
    b, t = paired["rows"].unbind(1)
    torch.testing.assert_close(paired["student"], full[b, t, :72], **F64)
    n = int((batch["labels"][:, 1:] != -100).sum())
    expected = reference_divergence(full[b, t, :72], paired["teacher"]).sum() / n
    torch.testing.assert_close(out.loss_terms["kd"], expected, **F64)


class _Tok:
    """The part of a tokenizer the vocabulary check reads."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}


def test_vocabulary_prefix_is_checked_with_tokenizers():
    student, teacher = _models()
    words = [f"w{i}" for i in range(80)]
    other = list(words)
    other[17] = "different"
    vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, student_tokenizer=_Tok(words),
                    teacher_tokenizer=_Tok(words)).unwrap()
    with pytest.raises(vlmdistill.IncompatibleTeacherError,
                       match="disagree at id 17: 'w17' for the student vs 'different'"):
        vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, student_tokenizer=_Tok(words),
                        teacher_tokenizer=_Tok(other))


def test_detached_kd_has_no_gradient_path_through_the_teacher():
    """Default: the teacher runs without autograd and KD's gradient equals the gradient with the teacher's
    logits as constants; the teacher's parameters get nothing."""
    student, teacher = _models()
    batch = _batch()
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, alpha=1.0)
    out = wrapped(**batch)
    torch.testing.assert_close(out.loss, out.loss_terms["kd"])  # α = 1, every supervised row distilled
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in teacher.parameters())

    student.zero_grad()
    paired = wrapped.plugin.paired_logits(student, batch)
    assert not paired["teacher"].requires_grad
    logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
    b, t = paired["rows"].unbind(1)
    n = int((batch["labels"][:, 1:] != -100).sum())
    (reference_divergence(logits[b, t], paired["teacher"]).sum() / n).backward()
    for name, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_without_detach_kd_gradient_reaches_the_students_kv_projections():
    def kd_grads(detach):
        student, teacher = _models()
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, detach_shared_kv=detach,
                                  alpha=1.0)
        out = wrapped(**_batch())
        torch.testing.assert_close(out.loss, out.loss_terms["kd"])  # α = 1, every supervised row distilled
        out.loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        return {k: p.grad for k, p in student.named_parameters() if p.grad is not None}

    detached, attached = kd_grads(True), kd_grads(False)
    layers = "model.language_model.layers"
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            name = f"{layers}.{i}.self_attn.{proj}.weight"
            assert (attached[name] - detached[name]).abs().max() > 1e-6, name
    # The student's own head and final norm are not upstream of any K/V: same gradient either way.
    for name in ("lm_head.weight", "model.language_model.norm.weight"):
        torch.testing.assert_close(attached[name], detached[name], rtol=1e-8, atol=1e-12)
    # The projector feeds only the visual K/V seen by the teacher's text queries.
    name = "model.multi_modal_projector.linear_1.weight"
    assert (attached[name] - detached[name]).abs().max() > 1e-8


def test_automatic_chunks_take_their_size_from_the_vocabulary(monkeypatch):
    """chunk_rows=0 (the default) sizes the chunks like kd (`auto_chunk_rows` of the vocabulary and device); the
    loss and its gradient do not depend on the chunk size."""
    from vlmdistill.plugins.lingudistill import plugin as plugin_module

    student, teacher = _models()
    batch = _batch(n=3)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
    assert wrapped.plugin.config.chunk_rows == 0
    vlmdistill.unwrap(wrapped)

    def loss_and_grad(**config):
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, **config)
        sizes = []
        # 2-D inputs: the loss pass's chunks (the teacher's own forward calls its head on [B, 1, H])
        hook = teacher.lm_head.register_forward_hook(
            lambda m, args, out: sizes.append(args[0].shape[0]) if args[0].dim() == 2 else None)
        out = wrapped(**batch)
        out.loss.backward()
        hook.remove()
        grad = student.lm_head.weight.grad.clone()
        student.zero_grad(set_to_none=True)
        vlmdistill.unwrap(wrapped)
        return out.loss.detach(), grad, sizes

    monkeypatch.setattr(plugin_module, "auto_chunk_rows", lambda vocab, device: 2 if vocab == VOCAB else 0)
    loss_auto, grad_auto, sizes = loss_and_grad()
    assert sizes and max(sizes) == 2  # the teacher's head ran on chunks of the automatic size
    loss_one, grad_one, sizes_one = loss_and_grad(chunk_rows=1000)
    assert len(sizes_one) == 1
    torch.testing.assert_close(loss_auto, loss_one, **F64)
    torch.testing.assert_close(grad_auto, grad_one, **F64)
