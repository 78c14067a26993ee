"""LinguDistill's KV sharing, pinned on tiny LLaVA, Idefics3 and Qwen2-VL students in float64."""

from __future__ import annotations

import pytest
import torch
from contract_cases.lingudistill import (FAMILY_BUILDERS, collate, independent_teacher, language_model_copy,
                                         vlm_example)

import vlmdistill

FAMILIES = sorted(FAMILY_BUILDERS)
F64 = dict(rtol=1e-9, atol=1e-10)


def _batch(family, pad_side="right", seed=0, dtype=torch.float64, images=(2, 2)):
    g = torch.Generator().manual_seed(seed)
    examples = [vlm_example(family, g, image_at=images[0], length=14),
                vlm_example(family, g, image_at=images[1], length=12, answer=4)]
    batch = collate(examples, pad_side=pad_side)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


def _paired(student, teacher, batch, **config):
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, **config)
    try:
        return wrapped.plugin.paired_logits(student, batch)
    finally:
        vlmdistill.unwrap(wrapped)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["all", "visual", "prompt"])
@pytest.mark.parametrize("teacher_pass", ["text_only", "full_length"])
def test_copy_teacher_reproduces_student_logits(family, scope, teacher_pass):
    """Teacher = the student's own LM: with the student's K/V at the shared positions it must produce exactly
    the student's logits, image-conditioned text positions included (left padding, rows of different length)."""
    student = FAMILY_BUILDERS[family](seed=1, dtype=torch.float64).eval()
    teacher = language_model_copy(student)
    batch = _batch(family, pad_side="left")
    got = _paired(student, teacher, batch, share_scope=scope, teacher_pass=teacher_pass)
    assert got["rows"].shape[0] == 9  # every answer row of both samples is distilled
    torch.testing.assert_close(got["teacher"], got["student"], **F64)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharing_is_what_carries_the_image(family):
    """The same copy teacher run on the text alone (nothing shared) does not match the student after the
    image: the equality above comes from the shared K/V, not from the text."""
    student = FAMILY_BUILDERS[family](seed=1, dtype=torch.float64).eval()
    teacher = language_model_copy(student)
    batch = _batch(family)
    got = _paired(student, teacher, batch)
    ids = batch["input_ids"].clone()
    blind = teacher(input_ids=ids.clamp(max=teacher.config.vocab_size - 1),
                    attention_mask=batch["attention_mask"]).logits
    b, t = got["rows"].unbind(1)
    assert (blind[b, t] - got["student"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_shared_equals_plain_teacher_forward(family):
    """Text-only samples share nothing: the teacher pass is an ordinary forward of the teacher."""
    student = FAMILY_BUILDERS[family](seed=1, dtype=torch.float64).eval()
    teacher = independent_teacher(student)
    batch = _batch(family, images=(None, None))
    got = _paired(student, teacher, batch)
    plain = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b, t = got["rows"].unbind(1)
    torch.testing.assert_close(got["teacher"], plain[b, t], **F64)


def test_nothing_shared_with_left_padding_uses_the_students_positions():
    student = FAMILY_BUILDERS["llava"](seed=1, dtype=torch.float64).eval()
    teacher = independent_teacher(student)
    batch = _batch("llava", pad_side="left", images=(None, None))
    got = _paired(student, teacher, batch)
    plain = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b, t = got["rows"].unbind(1)
    torch.testing.assert_close(got["teacher"], plain[b, t], **F64)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["visual", "prompt"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_text_only_queries_equal_full_length_replacement(family, scope, pad_side):
    """The cheap form (teacher queries at non-shared positions only) equals the full-length pass with the K/V
    replaced at every shared position, for an independent teacher."""
    student = FAMILY_BUILDERS[family](seed=1, dtype=torch.float64).eval()
    teacher = independent_teacher(student)
    batch = _batch(family, pad_side=pad_side)
    cheap = _paired(student, teacher, batch, share_scope=scope, teacher_pass="text_only")
    full = _paired(student, teacher, batch, share_scope=scope, teacher_pass="full_length")
    assert torch.equal(cheap["rows"], full["rows"])
    torch.testing.assert_close(cheap["teacher"], full["teacher"], **F64)
    assert (cheap["teacher"] - cheap["student"]).abs().max() > 1e-3  # a different model: not trivially equal


def test_packed_documents_do_not_leak():
    """Two samples packed in one row (position ids restart, no attention mask, as transformers reads packing)
    give the teacher the same logits as the two samples in separate rows."""
    student = FAMILY_BUILDERS["llava"](seed=1, dtype=torch.float64).eval()
    teacher = independent_teacher(student)
    g = torch.Generator().manual_seed(3)
    a = vlm_example("llava", g, image_at=2, length=12)
    b = vlm_example("llava", g, image_at=3, length=12, answer=4)
    separate = {k: v.double() if v.is_floating_point() else v for k, v in collate([a, b]).items()}
    separate.pop("attention_mask")
    separate["use_cache"] = False  # transformers builds per-document masks only without a KV cache
    packed = {"use_cache": False, "input_ids": torch.cat([a["input_ids"], b["input_ids"]])[None],
              "labels": torch.cat([a["labels"], b["labels"]])[None],
              "position_ids": torch.cat([torch.arange(len(a["input_ids"])), torch.arange(len(b["input_ids"]))])[None],
              "pixel_values": separate["pixel_values"]}
    got_sep = _paired(student, teacher, separate, share_scope="prompt")
    got_packed = _paired(student, teacher, packed, share_scope="prompt")
    assert got_packed["rows"].shape[0] == got_sep["rows"].shape[0] == 9
    torch.testing.assert_close(got_packed["teacher"], got_sep["teacher"], **F64)
    torch.testing.assert_close(got_packed["student"], got_sep["student"], **F64)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant, monkeypatch):
    """Checkpointing re-runs attention in backward: nothing is captured twice, and with it on the stash copies
    the shared positions (without it, it holds the K/V autograd keeps anyway): same loss, same gradients."""
    from vlmdistill.plugins.lingudistill.attention import ForwardState

    kinds = []
    original = ForwardState.shared_kv

    def spy(self, layer):
        kinds.append("compact" if self.stash[layer][2] else "reference")
        return original(self, layer)

    monkeypatch.setattr(ForwardState, "shared_kv", spy)

    def run(checkpointing):
        student = FAMILY_BUILDERS["llava"](seed=1, dtype=torch.float64)
        teacher = independent_teacher(student)
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher)
        wrapped.train()
        g = torch.Generator().manual_seed(0)  # no padding: transformers' SDPA then keeps the K/V itself
        batch = collate([vlm_example("llava", g, image_at=2), vlm_example("llava", g, image_at=3)])
        out = wrapped(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.loss_terms["kd"].detach(), grads

    loss_a, kd_a, grads_a = run(False)
    assert kinds == ["reference"] * 2
    loss_b, kd_b, grads_b = run(True)
    assert kinds[2:] == ["compact"] * 2
    assert kd_a > 0
    torch.testing.assert_close(loss_b, loss_a, **F64)
    torch.testing.assert_close(kd_b, kd_a, **F64)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-8, atol=1e-10, msg=name)


def test_two_wrapped_models_keep_their_own_state():
    """Each wrapper registers its own attention function and per-forward state: interleaved forwards of two
    wrapped models give what each gives alone."""
    batch = _batch("llava")
    alone = []
    for seed in (1, 2):
        s = FAMILY_BUILDERS["llava"](seed=seed, dtype=torch.float64).eval()
        alone.append(_paired(s, independent_teacher(s, seed=seed + 10), batch)["teacher"])
    students = [FAMILY_BUILDERS["llava"](seed=seed, dtype=torch.float64).eval() for seed in (1, 2)]
    wrapped = [vlmdistill.wrap(s, plugin="lingudistill", teacher=independent_teacher(s, seed=seed + 10))
               for s, seed in zip(students, (1, 2))]
    together = [w.plugin.paired_logits(s, batch)["teacher"] for w, s in zip(wrapped, students)]
    for got, ref in zip(together, alone):
        torch.testing.assert_close(got, ref, **F64)
    assert (alone[0] - alone[1]).abs().max() > 1e-3


def test_unwrap_unregisters_the_attention_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    student = FAMILY_BUILDERS["llava"](seed=1)
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=independent_teacher(student))
    names = list(wrapped.plugin.router.names.values())
    assert names and student.config.text_config._attn_implementation in names
    assert wrapped.teacher.config._attn_implementation in names
    vlmdistill.unwrap(wrapped)
    assert not set(names) & set(AttentionInterface._global_mapping)
    assert not set(names) & set(AttentionMaskInterface._global_mapping)
    assert student.config.text_config._attn_implementation == "sdpa"
    assert student.config.vision_config._attn_implementation == "sdpa"


def test_layout_moves_to_the_teachers_device():
    from vlmdistill.plugins.lingudistill.layout import build_layout

    valid = torch.ones(2, 6, dtype=torch.bool)
    shared = torch.zeros(2, 6, dtype=torch.bool)
    shared[:, 1:3] = True
    distilled = torch.zeros(2, 6, dtype=torch.bool)
    distilled[0, 4] = distilled[1, 3:5] = True
    layout = build_layout(shared=shared, distilled=distilled, valid=valid, segments=None, full_length=False)
    # packed row after row: the teacher's queries (text up to the last distilled row), the shared keys
    assert layout.query_index.tolist() == [0, 3, 4, 0, 3, 4] and layout.query_row.tolist() == [0, 0, 0, 1, 1, 1]
    assert layout.query_offsets == (0, 3, 6) and layout.shared_offsets == (0, 2, 4)
    assert layout.shared_index.tolist() == [1, 2, 1, 2] and layout.distill_slot.tolist() == [2, 4, 5]
    moved = layout.to("meta")
    assert moved.query_index.is_meta and moved.distill_position[1].is_meta and moved.segments is None
    assert layout.to("cpu") is layout
