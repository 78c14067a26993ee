"""Two-source attention: the Triton kernel (through the interpreter on CPU) against a float64 reference.

conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported when there is no GPU. Shapes are kept
small: the interpreter costs per program and per loop step.
"""

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from vlmdistill.kernels import choose_backend, two_source_attention, two_source_attention_reference
from vlmdistill.kernels.inputs import check_tensors, normalize_masks
from vlmdistill.kernels.reference import attention_from_mask

kernels = pytest.importorskip("vlmdistill.kernels.triton_kv_share")
KernelConfig = kernels.KernelConfig
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK_KEYS = ("pos_q", "pos_shared", "pos_own", "seg_q", "seg_shared", "seg_own", "valid_shared", "valid_own")


# ----------------------------------------------------------------------------------------------------------------
# Problem builders
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    q: torch.Tensor
    k_shared: torch.Tensor
    v_shared: torch.Tensor
    k_own: torch.Tensor
    v_own: torch.Tensor
    masks: dict = field(default_factory=dict)

    @property
    def tensors(self):
        return self.q, self.k_shared, self.v_shared, self.k_own, self.v_own

    def cast(self, dtype):
        return Problem(*(t.to(dtype) for t in self.tensors), self.masks)


def _tensors(gen, batch, q_heads, kv_heads, n_q, n_s, n_o, head_dim, dtype=torch.float32):
    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    # Scaled queries make the softmax peaky enough for masking mistakes to show.
    return (2.0 * draw(batch, q_heads, n_q, head_dim), draw(batch, kv_heads, n_s, head_dim),
            draw(batch, kv_heads, n_s, head_dim), draw(batch, kv_heads, n_o, head_dim),
            draw(batch, kv_heads, n_o, head_dim))


def _pad_rows(rows, padding, gen, *, pad_pos=None):
    """Stack per-row (pos, seg) lists into [B, T] with padding on the given side; returns pos, seg, valid.
    Padding gets random positions/segments (they must not matter) unless pad_pos is given."""
    length = max(len(p) for p, _ in rows)
    pos = torch.randint(0, 50, (len(rows), length), generator=gen)
    seg = torch.randint(0, 3, (len(rows), length), generator=gen)
    if pad_pos is not None:
        pos.fill_(pad_pos)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (p, s) in enumerate(rows):
        cols = slice(length - len(p), length) if padding == "left" else slice(0, len(p))
        pos[b, cols] = torch.tensor(p, dtype=torch.long)
        seg[b, cols] = torch.tensor(s, dtype=torch.long)
        valid[b, cols] = True
    return pos, seg, valid


def lingudistill_problem(seed, *, batch, q_heads, kv_heads, head_dim, docs_per_row, padding="right",
                         segments=True, dtype=torch.float32):
    """Packed rows of documents laid out like a VLM prompt: [text prefix][visual tokens][text]; positions restart
    per document. Shared source = the visual tokens, own source = the text tokens, queries = the text tokens.
    Query padding gets position -1, so those rows see no key at all."""
    gen = torch.Generator().manual_seed(seed)
    shared_rows, own_rows = [], []
    for _ in range(batch):
        shared_pos, shared_seg, own_pos, own_seg = [], [], [], []
        for doc in range(docs_per_row):
            prefix, visual, text = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in
                                    ((0, 4), (3, 21), (2, 17)))
            own_pos += list(range(prefix)) + list(range(prefix + visual, prefix + visual + text))
            shared_pos += list(range(prefix, prefix + visual))
            own_seg += [doc] * (prefix + text)
            shared_seg += [doc] * visual
        shared_rows.append((shared_pos, shared_seg))
        own_rows.append((own_pos, own_seg))
    pos_s, seg_s, valid_s = _pad_rows(shared_rows, padding, gen)
    pos_o, seg_o, valid_o = _pad_rows(own_rows, padding, gen)
    pos_q = torch.where(valid_o, pos_o, torch.full_like(pos_o, -1))
    masks = dict(pos_q=pos_q, pos_shared=pos_s, pos_own=pos_o, valid_shared=valid_s, valid_own=valid_o)
    if segments:
        masks.update(seg_q=seg_o, seg_shared=seg_s, seg_own=seg_o)
    tensors = _tensors(gen, batch, q_heads, kv_heads, pos_q.shape[1], pos_s.shape[1], pos_o.shape[1], head_dim,
                       dtype)
    return Problem(*tensors, {k: v.to(DEVICE) for k, v in masks.items()})


def random_problem(seed, *, batch, q_heads, kv_heads, head_dim, n_q, n_s, n_o, n_segments=3, p_valid=0.8,
                   dtype=torch.float32):
    """Unordered random positions, segments and validity: stresses the tile bounds beyond sorted layouts."""
    gen = torch.Generator().manual_seed(seed)

    def ints(high, n):
        return torch.randint(0, high, (batch, n), generator=gen)

    masks = dict(pos_q=ints(40, n_q), pos_shared=ints(40, n_s), pos_own=ints(40, n_o),
                 valid_shared=torch.rand(batch, n_s, generator=gen) < p_valid,
                 valid_own=torch.rand(batch, n_o, generator=gen) < p_valid)
    if n_segments > 1:
        masks.update(seg_q=ints(n_segments, n_q), seg_shared=ints(n_segments, n_s), seg_own=ints(n_segments, n_o))
    tensors = _tensors(gen, batch, q_heads, kv_heads, n_q, n_s, n_o, head_dim, dtype)
    return Problem(*tensors, {k: v.to(DEVICE) for k, v in masks.items()})


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def float64_reference(problem: Problem, **kw):
    return two_source_attention_reference(*(t.double() for t in problem.tensors), **problem.masks, **kw)


def run_kernel_poisoned(problem: Problem, config=None, scale=None, tile_stats=None):
    """Forward kernel writing into NaN-filled buffers, so an unwritten element shows up."""
    shapes = check_tensors(*problem.tensors)
    masks = normalize_masks(shapes, problem.q.device, **problem.masks).for_kernel()
    out = torch.full_like(problem.q, float("nan"))
    lse = torch.full(problem.q.shape[:3], float("nan"), dtype=torch.float32, device=problem.q.device)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else scale
    kernels.two_source_forward(*problem.tensors, masks, shapes, scale, out=out, lse=lse, config=config,
                               tile_stats=tile_stats)
    return out, lse


def assert_matches(out, lse, ref_out, ref_lse, rel_tol):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    ref_out, ref_lse = ref_out.double().cpu(), ref_lse.double().cpu()
    out, lse = out.double().cpu(), lse.double().cpu()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without a visible key must have lse = -inf, only those"
    assert (out[empty] == 0).all(), "rows without a visible key must output 0"
    rel = (out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-12)
    assert rel < rel_tol, f"relative output error {rel:.3g} >= {rel_tol}"
    if (~empty).any():
        lse_err = ((lse - ref_lse)[~empty].abs() / ref_lse[~empty].abs().clamp_min(1.0)).max()
        assert lse_err < rel_tol, f"relative lse error {lse_err:.3g} >= {rel_tol}"


FP32_TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Forward kernel vs float64 reference
# ----------------------------------------------------------------------------------------------------------------

FORWARD_CASES = {
    # name: (builder kwargs, kernel config or None for the default)
    "mha-d32-1doc-right": (dict(kind="lingu", batch=1, q_heads=2, kv_heads=2, head_dim=32, docs_per_row=1,
                                padding="right", segments=False), None),
    "gqa3-d64-2docs-left": (dict(kind="lingu", batch=2, q_heads=6, kv_heads=2, head_dim=64, docs_per_row=2,
                                 padding="left"), KernelConfig(32, 16)),
    "gqa4-d32-3docs-right-small-tiles": (dict(kind="lingu", batch=2, q_heads=4, kv_heads=1, head_dim=32,
                                              docs_per_row=3, padding="right"), KernelConfig(16, 16)),
    "gqa3-d32-random-odd": (dict(kind="random", batch=2, q_heads=3, kv_heads=1, head_dim=32, n_q=23, n_s=41,
                                 n_o=30), KernelConfig(64, 32)),
    "mha-d64-random-no-segments": (dict(kind="random", batch=1, q_heads=2, kv_heads=2, head_dim=64, n_q=37,
                                        n_s=19, n_o=53, n_segments=1), None),
    "gqa4-d64-random-3seg": (dict(kind="random", batch=1, q_heads=4, kv_heads=1, head_dim=64, n_q=17, n_s=7,
                                  n_o=29), KernelConfig(32, 32)),
}


def build(seed, kind, **kw):
    return (lingudistill_problem if kind == "lingu" else random_problem)(seed, **kw)


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_float64_reference(name):
    builder, config = FORWARD_CASES[name]
    problem = build(sum(map(ord, name)), **builder)
    out, lse = run_kernel_poisoned(problem, config)
    ref_out, ref_lse = float64_reference(problem)
    assert_matches(out, lse, ref_out, ref_lse, FP32_TOL)


def test_forward_reads_strided_inputs_and_custom_scale():
    """Queries as a transposed [B, T, H, D] view (how attention layers hold them) and a non-default scale."""
    problem = lingudistill_problem(3, batch=2, q_heads=6, kv_heads=2, head_dim=32, docs_per_row=2)
    q_bthd = problem.q.transpose(1, 2).contiguous()
    strided = Problem(q_bthd.transpose(1, 2), *problem.tensors[1:], problem.masks)
    assert not strided.q.is_contiguous()
    out, lse = run_kernel_poisoned(strided, KernelConfig(32, 32), scale=0.3)
    ref_out, ref_lse = float64_reference(problem, scale=0.3)
    assert_matches(out, lse, ref_out, ref_lse, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision_inputs(dtype):
    problem = lingudistill_problem(5, batch=2, q_heads=6, kv_heads=2, head_dim=64, docs_per_row=2, dtype=dtype)
    out, lse = two_source_attention(*problem.tensors, **problem.masks, backend="triton")
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = float64_reference(problem)  # same rounded inputs, exact arithmetic
    assert_matches(out, lse, ref_out, ref_lse, rel_tol=1e-2)


def test_rows_without_visible_keys_give_zero_and_minus_inf():
    problem = random_problem(11, batch=1, q_heads=2, kv_heads=1, head_dim=32, n_q=9, n_s=6, n_o=6)
    problem.masks["pos_q"][0, :3] = -5  # before every key: nothing visible
    out, lse = run_kernel_poisoned(problem)
    assert torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] < 0).all()
    assert (out[0, :, :3] == 0).all()
    for backend in ("torch", "triton"):
        out_b, lse_b = two_source_attention(*problem.tensors, **problem.masks, backend=backend)
        assert not torch.isnan(out_b).any() and not torch.isnan(lse_b).any()


@pytest.mark.parametrize("n_s,n_o", [(0, 13), (9, 0), (0, 0)])
def test_empty_sources(n_s, n_o):
    problem = random_problem(2, batch=2, q_heads=2, kv_heads=1, head_dim=32, n_q=11, n_s=n_s, n_o=n_o)
    out, lse = run_kernel_poisoned(problem)
    ref_out, ref_lse = float64_reference(problem)
    assert_matches(out, lse, ref_out, ref_lse, FP32_TOL)


def test_garbage_in_padded_key_slots_never_reaches_the_output():
    problem = lingudistill_problem(8, batch=2, q_heads=2, kv_heads=1, head_dim=32, docs_per_row=2)
    ref_out, ref_lse = float64_reference(problem)
    for name, valid in (("shared", problem.masks["valid_shared"]), ("own", problem.masks["valid_own"])):
        assert (~valid).any()
        for t in (getattr(problem, f"k_{name}"), getattr(problem, f"v_{name}")):
            t.masked_fill_(~valid[:, None, :, None], float("nan"))
    out, lse = run_kernel_poisoned(problem, KernelConfig(16, 16))
    assert_matches(out, lse, ref_out, ref_lse, FP32_TOL)
    torch_out, _ = two_source_attention(*problem.tensors, **problem.masks, backend="torch")
    assert torch.allclose(torch_out.double(), ref_out, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Tile classification: skipped / full (no per-element mask) / masked
# ----------------------------------------------------------------------------------------------------------------

def test_tile_classification_on_a_vlm_prompt():
    """4 text tokens, 64 visual tokens, 60 text tokens; 16x16 tiles. Shared tiles: masked for the query tile
    holding the prefix (which precedes the image), full for the 3 others. Own tiles: full below the diagonal,
    masked on it, skipped above it."""
    prefix, visual, text = 4, 64, 60
    pos_shared = torch.arange(prefix, prefix + visual)[None]
    pos_own = torch.cat([torch.arange(prefix), torch.arange(prefix + visual, prefix + visual + text)])[None]
    gen = torch.Generator().manual_seed(0)
    problem = Problem(*_tensors(gen, 1, 1, 1, prefix + text, visual, prefix + text, 32),
                      dict(pos_q=pos_own.to(DEVICE), pos_shared=pos_shared.to(DEVICE), pos_own=pos_own.to(DEVICE)))
    stats = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    out, lse = run_kernel_poisoned(problem, KernelConfig(16, 16), tile_stats=stats)
    shared_skipped, shared_full, shared_masked, own_skipped, own_full, own_masked = stats.tolist()
    assert (shared_skipped, shared_full, shared_masked) == (0, 12, 4)
    assert (own_skipped, own_full, own_masked) == (6, 6, 4)
    assert_matches(out, lse, *float64_reference(problem), FP32_TOL)


def test_other_documents_tiles_are_skipped():
    """Packed rows: a query tile of document 1 skips every tile of document 0, even though its positions are
    smaller (positions restart per document)."""
    n = 32
    gen = torch.Generator().manual_seed(1)
    problem = Problem(*_tensors(gen, 1, 2, 2, n, n, n, 32), dict(
        pos_q=torch.arange(n)[None].to(DEVICE), pos_shared=torch.arange(n)[None].to(DEVICE),
        pos_own=torch.arange(n)[None].to(DEVICE), seg_q=torch.ones(1, n, dtype=torch.long, device=DEVICE),
        seg_shared=torch.zeros(1, n, dtype=torch.long, device=DEVICE),
        seg_own=torch.ones(1, n, dtype=torch.long, device=DEVICE)))
    stats = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    out, lse = run_kernel_poisoned(problem, KernelConfig(16, 16), tile_stats=stats)
    programs = 2 * 2  # query tiles x kv heads
    assert stats[:3].tolist() == [2 * programs, 0, 0]
    assert_matches(out, lse, *float64_reference(problem), FP32_TOL)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

def _nan_empty_like(t, **kw):
    return torch.full_like(t, float("nan"), **kw)


@pytest.mark.parametrize("name", ["gqa3-lingu-left", "mha-random"])
def test_backward_matches_float64_autograd(name, monkeypatch):
    if name == "gqa3-lingu-left":
        problem = lingudistill_problem(21, batch=2, q_heads=6, kv_heads=2, head_dim=32, docs_per_row=2,
                                       padding="left")
    else:
        problem = random_problem(22, batch=1, q_heads=2, kv_heads=2, head_dim=64, n_q=19, n_s=23, n_o=13)
    # Every buffer the kernels allocate starts as NaN: an element they fail to write shows up.
    monkeypatch.setattr(kernels.torch, "empty_like", _nan_empty_like)
    leaves = [t.clone().requires_grad_() for t in problem.tensors]
    d_out = torch.randn_like(problem.q)
    out, _ = two_source_attention(*leaves, **problem.masks, backend="triton")
    grads = torch.autograd.grad(out, leaves, d_out)
    monkeypatch.undo()
    ref_leaves = [t.double().requires_grad_() for t in problem.tensors]
    ref_out, _ = two_source_attention_reference(*ref_leaves, **problem.masks)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, d_out.double())
    for label, g, ref in zip(("q", "k_shared", "v_shared", "k_own", "v_own"), grads, ref_grads):
        assert not torch.isnan(g).any(), f"d{label} has unwritten (NaN) elements"
        rel = (g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert rel < 1e-5, f"d{label}: relative error {rel:.3g}"


def test_backward_through_shared_kv_only():
    """The detach_shared_kv=False ablation: only the student's K/V need gradients; others stay None."""
    problem = lingudistill_problem(4, batch=1, q_heads=3, kv_heads=1, head_dim=32, docs_per_row=1)
    k_s, v_s = (t.clone().requires_grad_() for t in (problem.k_shared, problem.v_shared))
    out, _ = two_source_attention(problem.q, k_s, v_s, problem.k_own, problem.v_own, **problem.masks,
                                  backend="triton")
    out.square().sum().backward()
    ref_k, ref_v = (t.double().requires_grad_() for t in (problem.k_shared, problem.v_shared))
    ref_out, _ = two_source_attention_reference(problem.q.double(), ref_k, ref_v, problem.k_own.double(),
                                                problem.v_own.double(), **problem.masks)
    ref_out.square().sum().backward()
    for g, ref in ((k_s.grad, ref_k.grad), (v_s.grad, ref_v.grad)):
        assert (g.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_backward_with_rows_that_see_nothing_is_finite():
    problem = random_problem(31, batch=1, q_heads=2, kv_heads=1, head_dim=32, n_q=8, n_s=5, n_o=5)
    problem.masks["pos_q"][0, :4] = -1
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in problem.tensors]
        out, _ = two_source_attention(*leaves, **problem.masks, backend=backend)
        grads = torch.autograd.grad(out.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads), backend


# ----------------------------------------------------------------------------------------------------------------
# Reference semantics (the oracle must itself be right)
# ----------------------------------------------------------------------------------------------------------------

def test_reference_matches_sdpa_on_expanded_heads():
    problem = random_problem(41, batch=2, q_heads=6, kv_heads=2, head_dim=32, n_q=15, n_s=9, n_o=12)
    p64 = problem.cast(torch.float64)
    out, lse = two_source_attention_reference(*p64.tensors, **p64.masks)
    shapes = check_tensors(*p64.tensors)
    masks = normalize_masks(shapes, p64.q.device, **p64.masks)
    from vlmdistill.kernels.reference import visibility_mask

    allowed = visibility_mask(masks)  # [B, Tq, Tk]
    k = torch.cat([p64.k_shared, p64.k_own], 2).repeat_interleave(3, dim=1)
    v = torch.cat([p64.v_shared, p64.v_own], 2).repeat_interleave(3, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(p64.q, k, v, attn_mask=allowed[:, None])
    scores = (p64.q @ k.transpose(-1, -2)) / math.sqrt(32)
    expected_lse = scores.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1)
    seen = allowed.any(-1)[:, None, :].expand_as(lse)
    assert torch.allclose(out[seen], expected[seen], atol=1e-10)
    assert torch.allclose(lse[seen], expected_lse[seen], atol=1e-10)


def test_text_queries_equal_the_full_length_merged_pass():
    """LinguDistill's cheaper form: text-position outputs over {shared K/V} + {own K/V} equal the full-length
    causal pass over K/V merged with torch.where at the visual positions (one layer, one document)."""
    gen = torch.Generator().manual_seed(5)
    total, hq, hkv, d = 40, 4, 2, 32
    is_visual = torch.zeros(total, dtype=torch.bool)
    is_visual[3:25] = True
    q_full = torch.randn(1, hq, total, d, generator=gen, dtype=torch.float64)
    k_student, v_student, k_teacher, v_teacher = (torch.randn(1, hkv, total, d, generator=gen,
                                                              dtype=torch.float64) for _ in range(4))
    k_merged = torch.where(is_visual[None, None, :, None], k_student, k_teacher)
    v_merged = torch.where(is_visual[None, None, :, None], v_student, v_teacher)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    full = torch.nn.functional.scaled_dot_product_attention(q_full, k_merged, v_merged, attn_mask=causal,
                                                            enable_gqa=True)
    pos = torch.arange(total)
    text = ~is_visual
    out, _ = two_source_attention(q_full[:, :, text], k_student[:, :, is_visual], v_student[:, :, is_visual],
                                  k_teacher[:, :, text], v_teacher[:, :, text], pos_q=pos[text],
                                  pos_shared=pos[is_visual], pos_own=pos[text], backend="torch")
    assert torch.allclose(out, full[:, :, text], atol=1e-12)
    out_kernel, _ = two_source_attention(*(t.float() for t in (
        q_full[:, :, text], k_student[:, :, is_visual], v_student[:, :, is_visual], k_teacher[:, :, text],
        v_teacher[:, :, text])), pos_q=pos[text], pos_shared=pos[is_visual], pos_own=pos[text], backend="triton")
    assert (out_kernel.double() - full[:, :, text]).abs().max() < 1e-5


def test_reference_empty_keys():
    q = torch.randn(1, 2, 3, 8)
    out, lse = attention_from_mask(q, torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8),
                                   torch.zeros(1, 3, 0, dtype=torch.bool), 0.5)
    assert (out == 0).all() and torch.isinf(lse).all()


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------

def test_public_api_triton_equals_torch():
    problem = lingudistill_problem(6, batch=2, q_heads=4, kv_heads=2, head_dim=32, docs_per_row=2)
    out_t, lse_t = two_source_attention(*problem.tensors, **problem.masks, backend="triton")
    out_r, lse_r = two_source_attention(*problem.tensors, **problem.masks, backend="torch")
    assert out_t.shape == problem.q.shape and lse_t.shape == problem.q.shape[:3]
    assert lse_t.dtype == lse_r.dtype == torch.float32
    assert torch.allclose(out_t, out_r, atol=1e-5)
    assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_r))


@pytest.mark.parametrize("head_dim", [8, 16, 48])
def test_other_head_dims_run_zero_padded(head_dim):
    """Tiny test models have head_dim 8; 16 runs as is, 8 and 48 are padded to 16 and 64."""
    problem = lingudistill_problem(9, batch=1, q_heads=4, kv_heads=2, head_dim=head_dim, docs_per_row=1)
    leaves = [t.clone().requires_grad_() for t in problem.tensors]
    out, lse = two_source_attention(*leaves, **problem.masks, backend="triton")
    assert out.shape == problem.q.shape
    ref_leaves = [t.double().requires_grad_() for t in problem.tensors]
    ref_out, ref_lse = two_source_attention_reference(*ref_leaves, **problem.masks)
    assert_matches(out.detach(), lse, ref_out.detach(), ref_lse, FP32_TOL)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, d_out.double())
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape and (g.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_per_token_tensors_broadcast_over_the_batch():
    problem = random_problem(7, batch=2, q_heads=2, kv_heads=1, head_dim=32, n_q=6, n_s=4, n_o=6, n_segments=1)
    masks = {k: v[0] for k, v in problem.masks.items()}  # [T]: the same layout in every row
    out, _ = two_source_attention(*problem.tensors, **masks, backend="triton")
    expanded = {k: v[None].expand(2, -1) for k, v in masks.items()}
    ref, _ = two_source_attention(*problem.tensors, **expanded, backend="torch")
    assert torch.allclose(out, ref, atol=1e-5)


def test_backend_choice():
    shapes = check_tensors(*(torch.empty(1, 2, 3, 32) for _ in range(5)))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", shapes, torch.float32, cpu) == "torch"
    assert choose_backend("auto", shapes, torch.bfloat16, cuda) == "triton"
    assert choose_backend("auto", shapes, torch.float64, cuda) == "torch"
    assert choose_backend("torch", shapes, torch.bfloat16, cuda) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("flash", shapes, torch.float32, cpu)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        choose_backend("triton", shapes, torch.float64, cuda)
    odd = check_tensors(*(torch.empty(1, 2, 3, 48) for _ in range(5)))
    assert choose_backend("auto", odd, torch.bfloat16, cuda) == "triton"  # zero-padded to 64
    wide = check_tensors(*(torch.empty(1, 2, 3, 192) for _ in range(5)))
    assert choose_backend("auto", wide, torch.bfloat16, cuda) == "torch"
    with pytest.raises(ValueError, match="head_dim"):
        choose_backend("triton", wide, torch.bfloat16, cuda)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the CPU refusal without interpreter")
def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    shapes = check_tensors(*(torch.empty(1, 2, 3, 32) for _ in range(5)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        choose_backend("triton", shapes, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.__setitem__(0, torch.randn(1, 3, 5, 32)), "multiple of kv heads"),
    (lambda t: t.__setitem__(2, torch.randn(1, 2, 4, 32)), "differ"),
    (lambda t: t.__setitem__(slice(3, 5), [torch.randn(1, 2, 6, 16)] * 2), "head_dim"),
    (lambda t: t.__setitem__(4, t[4].double()), "one dtype"),
])
def test_invalid_tensors_are_rejected(mutate, message):
    tensors = [torch.randn(1, 4, 5, 32), torch.randn(1, 2, 3, 32), torch.randn(1, 2, 3, 32),
               torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)]
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        two_source_attention(*tensors, pos_q=torch.arange(5), pos_shared=torch.arange(3), pos_own=torch.arange(6))


def test_invalid_metadata_is_rejected():
    tensors = [torch.randn(2, 2, 5, 32), torch.randn(2, 1, 3, 32), torch.randn(2, 1, 3, 32),
               torch.randn(2, 1, 6, 32), torch.randn(2, 1, 6, 32)]
    good = dict(pos_q=torch.arange(5), pos_shared=torch.arange(3), pos_own=torch.arange(6))
    with pytest.raises(ValueError, match="pos_q must be"):
        two_source_attention(*tensors, **{**good, "pos_q": torch.arange(4)})
    with pytest.raises(ValueError, match="integer"):
        two_source_attention(*tensors, **{**good, "pos_own": torch.arange(6.0)})
    with pytest.raises(ValueError, match="bool"):
        two_source_attention(*tensors, **good, valid_own=torch.ones(6, dtype=torch.long))


def test_importing_the_package_does_not_import_the_triton_module(monkeypatch):
    import importlib

    import vlmdistill

    for name in [n for n in sys.modules if n.startswith("vlmdistill.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(vlmdistill, "kernels", None, raising=False)
    fresh = importlib.import_module("vlmdistill.kernels")
    assert hasattr(fresh, "two_source_attention")
    assert "vlmdistill.kernels.triton_kv_share" not in sys.modules


# ----------------------------------------------------------------------------------------------------------------
# Slow
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_forward_random_sweep(seed):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = int(torch.randint(1, 3, (1,), generator=gen))
    group = [1, 3, 4][seed % 3]
    head_dim = [32, 64, 128][seed % 3]
    config = KernelConfig(*[(16, 16), (32, 64), (64, 32)][seed % 3])
    problem = random_problem(100 + seed, batch=2, q_heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                             n_q=int(torch.randint(1, 80, (1,), generator=gen)),
                             n_s=int(torch.randint(0, 80, (1,), generator=gen)),
                             n_o=int(torch.randint(1, 80, (1,), generator=gen)))
    out, lse = run_kernel_poisoned(problem, config)
    assert_matches(out, lse, *float64_reference(problem), FP32_TOL)


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile every kernel to a cubin for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "vlmdistill.kernels.compile_check", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [dict(item.split("=") for item in line.split()) for line in result.stdout.splitlines() if "kernel=" in line]
    assert len(rows) >= 18
    # The main loops keep their K/V loads unconditional so that they are pipelined (async copies).
    assert all(int(r["async_copies"]) > 0 for r in rows), rows
