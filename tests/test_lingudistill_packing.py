"""The teacher pass packs rows of different lengths into one sequence (no padding); pinned in float64 against
each row alone, the full-length reference and the kernels' reference attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from contract_cases.lingudistill import independent_teacher, language_model_copy

import vlmdistill
from vlmdistill.eval.bench.presets import get_preset, make_batch, shared_token_ids, smolvlm_student
from vlmdistill.kernels import two_source_attention_reference
from vlmdistill.plugins.lingudistill.layout import build_layout
from vlmdistill.plugins.lingudistill import two_source
from vlmdistill.plugins.lingudistill.two_source import PackedAttention, torch_two_source_attention

F64 = dict(rtol=1e-9, atol=1e-10)
#: one row with 1 image, one with 5: the text the teacher reads differs by 4 images' worth of tokens
PRESET = dataclasses.replace(get_preset("tiny"), images_per_row=(1, 5))


def _student(seed=1):
    return smolvlm_student(PRESET, seed=seed, dtype=torch.float64).eval()


def _batch(**kw):
    return make_batch(PRESET, dtype=torch.float64, **kw)


def _paired(student, teacher, batch, inputs_seen=None, **config):
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher,
                              extra_shared_token_ids=shared_token_ids(PRESET), **config)
    hook = None
    if inputs_seen is not None:
        hook = teacher.register_forward_pre_hook(lambda m, a, kw: inputs_seen.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        return wrapped.plugin.paired_logits(student, batch)
    finally:
        if hook is not None:
            hook.remove()
        vlmdistill.unwrap(wrapped)


def _needed_text_tokens(batch) -> list[int]:
    """Per row, from the batch alone: positions the teacher can read, up to the last supervised logit row."""
    ids, labels = batch["input_ids"], batch["labels"]
    visual = torch.isin(ids, torch.tensor(shared_token_ids(PRESET) + [PRESET.image_token_id]))
    counts = []
    for b in range(ids.shape[0]):
        last = int((labels[b, 1:] != -100).nonzero().max())  # logit row `last` predicts the last label
        counts.append(int((~visual[b, :last + 1]).sum()))
    return counts


def test_rows_of_different_lengths_run_packed_without_padding():
    """The teacher sees one packed row holding exactly the needed tokens of both rows; each row's teacher logits
    equal that row run alone, and the full-length reference pass."""
    student = _student()
    teacher = independent_teacher(student)
    batch = _batch()
    needed = _needed_text_tokens(batch)
    assert needed[0] - needed[1] == 4 * (PRESET.image_tokens + 3)  # 4 more images (+ their 3 markers)
    shapes = []
    together = _paired(student, teacher, batch, inputs_seen=shapes)
    assert shapes == [torch.Size([1, sum(needed)])]
    full = _paired(student, teacher, batch, teacher_pass="full_length")
    torch.testing.assert_close(together["teacher"], full["teacher"], **F64)
    for b in range(2):
        alone = _paired(student, teacher, {k: v[b:b + 1] for k, v in batch.items()})
        rows = together["rows"][:, 0] == b
        torch.testing.assert_close(together["teacher"][rows], alone["teacher"], **F64)
        torch.testing.assert_close(together["student"][rows], alone["student"], **F64)
    assert (together["teacher"] - together["student"]).abs().max() > 1e-3  # an independent teacher


def test_copy_teacher_reproduces_the_student_on_rows_of_different_lengths():
    """A teacher holding the student LM's weights gives exactly the student's logits through the packed pass."""
    student = _student()
    got = _paired(student, language_model_copy(student), _batch())
    assert got["rows"].shape[0] == 2 * PRESET.supervised
    torch.testing.assert_close(got["teacher"], got["student"], **F64)


def _random_layout(g, batch=3, length=40, segments=False):
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :7] = False                                       # left padding
    valid[2, -5:] = False                                      # right padding
    shared = torch.rand(batch, length, generator=g) < 0.4
    distilled = (torch.rand(batch, length, generator=g) < 0.3) & valid & ~shared
    distilled[:, length // 2] = True                           # every row has one
    shared &= valid
    seg = None
    if segments:
        seg = (torch.arange(length) >= length // 3).long().expand(batch, -1).clone()
        seg[0] = 0
    return build_layout(shared=shared, distilled=distilled & valid, valid=valid, segments=seg, full_length=False)


@pytest.mark.parametrize("block", [two_source.QUERY_BLOCK, 3])
@pytest.mark.parametrize("segments", [False, True])
def test_packed_two_source_attention_equals_the_reference_row_by_row(segments, block, monkeypatch):
    """The blocked masked SDPA over the packed layout equals `two_source_attention_reference` (the kernels'
    float64 oracle) on each row's own keys, padding and packed documents included; with small blocks each call
    gets only the keys its queries can see, every visible pair exactly once."""
    monkeypatch.setattr(two_source, "QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(4)
    layout = _random_layout(g, segments=segments)
    hq, hkv, d = 6, 2, 8
    nq, ns = layout.num_queries, layout.shared_offsets[-1]
    q, ko, vo = (torch.randn(1, h, nq, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    ks, vs = (torch.randn(1, hkv, ns, d, generator=g, dtype=torch.float64) for _ in range(2))
    plan = PackedAttention(layout, "cpu", full_length=False)
    got = torch_two_source_attention(q, ks, vs, ko, vo, plan, scale=0.3)
    blocks = plan.blocks()
    assert max(b.queries.stop - b.queries.start for b in blocks) <= block
    computed = sum(b.allowed.numel() for b in blocks)
    rectangle = sum((qb - qa) * (qb - qa + sb - sa) for (qa, qb), (sa, sb) in zip(plan.query_bounds,
                                                                                  plan.shared_bounds))
    seg_q, seg_s = layout.query_segments(), layout.shared_segments()
    visible = 0
    for (qa, qb), (sa, sb) in zip(plan.query_bounds, plan.shared_bounds):
        pos_q, pos_k = layout.query_index[qa:qb], torch.cat([layout.shared_index[sa:sb], layout.query_index[qa:qb]])
        seen = (pos_k[None] <= pos_q[:, None]) & torch.cat([torch.ones(sb - sa, dtype=torch.bool),
                                                             layout.own_valid[qa:qb]])[None]
        if segments:
            seen &= torch.cat([seg_s[sa:sb], seg_q[qa:qb]])[None] == seg_q[qa:qb, None]
        visible += int(seen.sum())
    assert sum(int(b.allowed.sum()) for b in blocks) == visible
    assert computed - visible < (rectangle - visible) / 4 if block == 3 else computed <= rectangle
    for (qa, qb), (sa, sb) in zip(plan.query_bounds, plan.shared_bounds):
        kw = {}
        if segments:
            kw = dict(seg_q=seg_q[qa:qb], seg_shared=seg_s[sa:sb], seg_own=seg_q[qa:qb])
        ref, _ = two_source_attention_reference(
            q[:, :, qa:qb], ks[:, :, sa:sb], vs[:, :, sa:sb], ko[:, :, qa:qb], vo[:, :, qa:qb],
            pos_q=layout.query_index[qa:qb], pos_shared=layout.shared_index[sa:sb], pos_own=layout.query_index[qa:qb],
            valid_own=layout.own_valid[qa:qb], scale=0.3, **kw)
        torch.testing.assert_close(got[:, :, qa:qb], ref, **F64)


def test_unpacking_for_the_kernel_round_trips_and_pads_queries_out():
    g = torch.Generator().manual_seed(5)
    layout = _random_layout(g)
    plan = PackedAttention(layout, "cpu", full_length=False)
    x = torch.randn(1, 3, layout.num_queries, 4, generator=g)
    padded = plan.unpack(x, "query")
    assert padded.shape[0] == 3 and padded.shape[2] == max(b - a for a, b in plan.query_bounds)
    assert torch.equal(plan.pack(padded), x)
    meta = plan.padded()["meta"]
    lengths = torch.tensor([b - a for a, b in plan.query_bounds])
    pad = torch.arange(padded.shape[2])[None, :] >= lengths[:, None]
    assert bool((meta["pos_q"][pad] == -1).all()) and not bool(meta["valid_own"][pad].any())
    assert bool((padded[pad[:, None, :, None].expand_as(padded)] == 0).all())


def test_fused_kernel_on_rows_of_different_lengths_gives_the_torch_path():
    """kernel='triton' (the interpreter on the CPU) runs the packed rows unpacked into a padded batch whose padding
    queries see no key; its teacher logits equal the per-row masked-SDPA path."""
    pytest.importorskip("triton")
    student = smolvlm_student(PRESET, seed=1).eval()
    teacher = independent_teacher(student)
    batch = make_batch(PRESET)
    torch_path = _paired(student, teacher, batch, kernel="torch")
    fused = _paired(student, teacher, batch, kernel="triton")
    assert torch.equal(torch_path["rows"], fused["rows"])
    torch.testing.assert_close(fused["teacher"], torch_path["teacher"], rtol=1e-4, atol=1e-5)


def test_fused_kernel_under_autocast_gives_the_torch_path():
    """Under bf16 autocast RoPE leaves the teacher's q and k in fp32 and v in bf16: the kernel runs them in one
    dtype (the autocast one, as SDPA would) and agrees with the masked-SDPA path."""
    pytest.importorskip("triton")
    student = smolvlm_student(PRESET, seed=1).eval()
    teacher = independent_teacher(student)
    batch = make_batch(PRESET)
    got = {}
    for kernel in ("torch", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[kernel] = _paired(student, teacher, batch, kernel=kernel)
    assert got["triton"]["teacher"].dtype == torch.bfloat16
    torch.testing.assert_close(got["triton"]["teacher"].float(), got["torch"]["teacher"].float(), rtol=0.05,
                               atol=0.05)
