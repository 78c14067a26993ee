"""The Triton two-source attention kernel, compiled for the GPU, against the float64 reference: forward (into
NaN-poisoned buffers, so an unwritten element fails) and backward (all five inputs), for each dtype, head dim and
GQA group, on VLM-prompt rows with key padding, with and without packed documents."""

from __future__ import annotations

import itertools
import os
import time

import torch

#: relative Frobenius error allowed (output, gradients); fp32 uses IEEE dots in the kernel
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (5e-3, 1e-2), "bfloat16": (2e-2, 4e-2)}


def _rows(gen, batch: int, docs: int, scale: int):
    """Per row: (shared positions, shared docs, own positions, own docs) of `docs` packed VLM prompts
    ([text prefix][visual][text], positions restarting per document)."""
    rows = []
    for _ in range(batch):
        sp, sd, op, od = [], [], [], []
        for doc in range(docs):
            prefix, visual, text = (int(torch.randint(lo * scale, hi * scale, (1,), generator=gen)) for lo, hi in
                                    ((1, 3), (4, 20), (3, 20)))
            op += list(range(prefix)) + list(range(prefix + visual, prefix + visual + text))
            sp += list(range(prefix, prefix + visual))
            od += [doc] * (prefix + text)
            sd += [doc] * visual
        rows.append((sp, sd, op, od))
    return rows


def _pad(lists, fill):
    width = max(len(x) for x in lists)
    out = torch.full((len(lists), width), fill, dtype=torch.long)
    valid = torch.zeros(len(lists), width, dtype=torch.bool)
    for b, x in enumerate(lists):
        out[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        valid[b, :len(x)] = True
    return out, valid


def make_case(seed: int, *, dtype, head_dim: int, group: int, documents: bool, device, scale: int,
              kv_heads: int = 2, batch: int = 2):
    """Tensors (in `dtype`) and metadata of one problem; rows of different length, right-padded (padding keys
    invalid, padding queries at position -1: they see no key)."""
    gen = torch.Generator().manual_seed(seed)
    rows = _rows(gen, batch, 2 if documents else 1, scale)
    pos_s, valid_s = _pad([r[0] for r in rows], 0)
    seg_s, _ = _pad([r[1] for r in rows], 0)
    pos_o, valid_o = _pad([r[2] for r in rows], 0)
    seg_o, _ = _pad([r[3] for r in rows], 0)
    masks = dict(pos_q=torch.where(valid_o, pos_o, -1), pos_shared=pos_s, pos_own=pos_o, valid_shared=valid_s,
                 valid_own=valid_o)
    if documents:
        masks.update(seg_q=seg_o, seg_shared=seg_s, seg_own=seg_o)
    q_heads = kv_heads * group

    def draw(heads, n, factor=1.0):
        return (factor * torch.randn(batch, heads, n, head_dim, generator=gen)).to(device=device, dtype=dtype)

    tensors = (draw(q_heads, pos_o.shape[1], 2.0), draw(kv_heads, pos_s.shape[1]), draw(kv_heads, pos_s.shape[1]),
               draw(kv_heads, pos_o.shape[1]), draw(kv_heads, pos_o.shape[1]))
    return tensors, {k: v.to(device) for k, v in masks.items()}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def check_case(seed: int, *, dtype: str, head_dim: int, group: int, documents: bool, device, scale: int) -> dict:
    from vlmdistill.kernels import two_source_attention, two_source_attention_reference
    from vlmdistill.kernels import triton_kv_share
    from vlmdistill.kernels.inputs import check_tensors, normalize_masks

    start = time.perf_counter()
    tensors, masks = make_case(seed, dtype=getattr(torch, dtype), head_dim=head_dim, group=group,
                               documents=documents, device=device, scale=scale)
    ref_in = [t.detach().double().requires_grad_(True) for t in tensors]
    ref_out, ref_lse = two_source_attention_reference(*ref_in, **masks)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_out = grad_out.to(device)
    ref_out.backward(grad_out)

    # forward into poisoned buffers: every element must be written
    shapes = check_tensors(*tensors)
    kernel_masks = normalize_masks(shapes, tensors[0].device, **masks).for_kernel()
    out = torch.full_like(tensors[0], float("nan"))
    lse = torch.full(tensors[0].shape[:3], float("nan"), dtype=torch.float32, device=device)
    triton_kv_share.two_source_forward(*tensors, kernel_masks, shapes, head_dim ** -0.5, out=out, lse=lse)
    seen = torch.isfinite(ref_lse)
    lse_ok = bool(torch.equal(torch.isfinite(lse), seen)) and not bool(lse.isnan().any())
    fwd_error = _rel(out, ref_out)
    lse_error = _rel(lse[seen], ref_lse[seen])

    # backward through the public API (the kernel's own dQ and dK/dV kernels)
    inputs = [t.detach().requires_grad_(True) for t in tensors]
    got, _ = two_source_attention(*inputs, **masks, backend="triton")
    got.backward(grad_out.to(got.dtype))
    grad_errors = {name: _rel(x.grad, r.grad) for name, x, r in
                   zip(("q", "k_shared", "v_shared", "k_own", "v_own"), inputs, ref_in)}
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    ok = (fwd_error <= fwd_tol and lse_error <= fwd_tol and lse_ok
          and all(e <= bwd_tol for e in grad_errors.values()))
    return {"dtype": dtype, "head_dim": head_dim, "group": group, "packed_documents": documents, "padding": True,
            "queries": int(tensors[0].shape[2]), "shared_keys": int(tensors[1].shape[2]),
            "forward_rel_error": fwd_error, "lse_rel_error": lse_error, "lse_empty_rows_ok": lse_ok,
            "grad_rel_error": grad_errors, "tolerance": {"forward": fwd_tol, "backward": bwd_tol}, "ok": ok,
            "seconds": round(time.perf_counter() - start, 2)}


def run(device, *, dry: bool, time_cap_s: float = 150.0) -> dict:
    """Every case (cases past `time_cap_s` are listed as not run); on the GPU the kernels must be compiled
    (TRITON_INTERPRET unset)."""
    from vlmdistill.kernels import triton_kv_share

    interpreted = triton_kv_share.INTERPRETING
    if device.type == "cuda" and interpreted:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
    if dry:  # the plumbing, through the interpreter, in seconds
        grid = [("float32", 16, 1, True), ("bfloat16", 16, 3, False), ("float16", 32, 5, True)]
        scale = 1
    else:
        grid = [(dt, d, g, True) for dt, d, g in itertools.product(("float32", "float16", "bfloat16"), (64, 128),
                                                                    (1, 3, 5))]
        grid += [("bfloat16", d, g, False) for d, g in itertools.product((64, 128), (1, 3, 5))]
        scale = 16  # rows of a few hundred to ~1200 tokens
    start, cases, not_run = time.perf_counter(), [], []
    for i, (dt, d, g, docs) in enumerate(grid):
        if time.perf_counter() - start > time_cap_s:  # compiling every variant is the cost; keep the rest's time
            not_run.append({"dtype": dt, "head_dim": d, "group": g, "packed_documents": docs})
            continue
        cases.append(check_case(i, dtype=dt, head_dim=d, group=g, documents=docs, device=device, scale=scale))
    return {"compiled": not interpreted, "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
            "cases": cases, "not_run_time_cap": not_run, "ok": all(c["ok"] for c in cases)}


def markdown(section: dict) -> list[str]:
    lines = [f"Not run (time cap): {section['not_run_time_cap']}", ""] if section.get("not_run_time_cap") else []
    lines += [f"Kernel {'compiled' if section['compiled'] else 'INTERPRETED (dry run)'}; relative Frobenius error "
             "against the float64 reference; rows right-padded, padding queries see no key.", "",
             "| dtype | head dim | GQA group | packed docs | queries | out | lse | worst grad | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in section["cases"]:
        worst = max(c["grad_rel_error"].items(), key=lambda kv: kv[1])
        lines.append(f"| {c['dtype']} | {c['head_dim']} | {c['group']} | {'yes' if c['packed_documents'] else 'no'} | "
                     f"{c['queries']} | {c['forward_rel_error']:.2e} | {c['lse_rel_error']:.2e} | "
                     f"{worst[1]:.2e} ({worst[0]}) | {'yes' if c['ok'] else 'NO'} |")
    return lines
