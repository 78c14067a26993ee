"""Benchmark the fused two-source attention kernel against stock-PyTorch ways to compute the same thing.

    python -m vlmdistill.eval.bench.bench_kv_share_attention --out results/bench_kv_share

On a CUDA machine: first a correctness check of every method against the torch reference (on two batch rows per
length), then timings (median of `triton.testing.do_bench`), useful TFLOP/s, speed-up of the fused kernel over
each baseline, extra peak memory, and the card's bf16 matmul rate measured in the same run. Without a GPU it runs
a tiny correctness smoke (the kernel through the Triton interpreter) and says that no timing was taken.

Workload: LinguDistill's teacher attention for one layer. Each row is a VLM prompt of `length` tokens:
[text prefix][visual tokens][text]. The fused kernel and baselines (b)-(d) compute teacher queries at text positions
only, over the student's K/V at visual positions plus the teacher's K/V at text positions; baseline (a) is the
full-length teacher pass over K/V merged with `torch.where`.

Methods
  fused          two_source_attention (Triton), compact K/V, no merged or concatenated cache
  a_merge_sdpa   torch.where merge + SDPA with the full boolean mask on the full-length pass (GQA expanded first,
                 as transformers does when it passes a mask)
  a_merge_causal the same with is_causal=True and no mask (flash backend; only valid without padding; context)
  b_two_sdpa     two SDPA calls (shared keys, own keys) with masks, merged by log-sum-exp
  c_flex         flex_attention (compiled) over concatenated compact K/V, position-lookup mask_mod
  d_flash_attn   flash-attn varlen, two calls merged by log-sum-exp, when flash-attn is installed (timing only:
                 its mask lets the text prefix see the image, so only rows after the image are checked)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmdistill.kernels import two_source_attention, two_source_attention_reference

from vlmdistill.eval.bench.output import add_out_argument, write_results

TARGETS = {"speedup_vs_a_merge_sdpa_at_4096": 1.5, "speedup_vs_b_two_sdpa": 1.0,
           "fused_fraction_of_matmul_rate_at_8192": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Token layout of a batch of prompts, all `length` long: `prefix` text, `n_visual[b]` visual, the rest text."""

    length: int
    prefix: int
    n_visual: list[int]

    @property
    def batch(self) -> int:
        return len(self.n_visual)

    def is_visual(self) -> torch.Tensor:
        idx = torch.arange(self.length)
        return torch.stack([(idx >= self.prefix) & (idx < self.prefix + v) for v in self.n_visual])

    def compact_indices(self):
        """Per-row positions of the visual / text tokens, right-padded: (shared_pos, valid_shared, own_pos,
        valid_own). Padding points at position 0 and is marked invalid."""
        vis = self.is_visual()
        shared = [torch.nonzero(row).flatten() for row in vis]
        own = [torch.nonzero(~row).flatten() for row in vis]
        return (*_right_pad(shared), *_right_pad(own))

    def visible_pairs(self) -> int:
        """Number of (text query, key) pairs the attention reads: the 'useful' work of every method."""
        total = 0
        for v in self.n_visual:
            after = self.length - self.prefix - v  # text after the image: sees prefix, image and earlier text
            total += self.prefix * (self.prefix + 1) // 2 + after * (self.prefix + v) + after * (after + 1) // 2
        return total


def _right_pad(rows):
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, :len(r)] = r
        valid[b, :len(r)] = True
    return idx, valid


def make_layout(length: int, batch: int, visual_min: int, visual_max: int, prefix: int, seed: int) -> Layout:
    gen = torch.Generator().manual_seed(seed + length)
    hi = min(visual_max, length - prefix - 1)
    lo = min(visual_min, hi)
    return Layout(length, prefix, [int(v) for v in torch.randint(lo, hi + 1, (batch,), generator=gen)])


@dataclass
class Workload:
    layout: Layout
    # full-length tensors (the student's and the teacher's K/V at every position, teacher queries everywhere)
    q_full: torch.Tensor
    k_student: torch.Tensor
    v_student: torch.Tensor
    k_teacher: torch.Tensor
    v_teacher: torch.Tensor
    # compact form read by the fused kernel
    q_text: torch.Tensor
    k_shared: torch.Tensor
    v_shared: torch.Tensor
    k_own: torch.Tensor
    v_own: torch.Tensor
    masks: dict
    own_index: torch.Tensor
    is_visual: torch.Tensor  # [B, T] bool, on the device


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.take_along_dim(x, index[:, None, :, None].to(x.device), dim=2)


def make_workload(layout: Layout, q_heads: int, kv_heads: int, head_dim: int, dtype, device, seed: int) -> Workload:
    gen = torch.Generator(device=device).manual_seed(seed)
    b, t = layout.batch, layout.length

    def draw(heads):
        return torch.randn(b, heads, t, head_dim, generator=gen, device=device, dtype=dtype)

    q_full, k_student, v_student, k_teacher, v_teacher = (draw(h) for h in (q_heads, kv_heads, kv_heads, kv_heads,
                                                                            kv_heads))
    shared_pos, valid_shared, own_pos, valid_own = layout.compact_indices()
    masks = dict(pos_q=torch.where(valid_own, own_pos, -1), pos_shared=shared_pos, pos_own=own_pos,
                 valid_shared=valid_shared, valid_own=valid_own)
    masks = {k: (v.to(torch.int32) if v.dtype == torch.long else v).to(device) for k, v in masks.items()}
    return Workload(layout, q_full, k_student, v_student, k_teacher, v_teacher,
                    _gather_tokens(q_full, own_pos), _gather_tokens(k_student, shared_pos),
                    _gather_tokens(v_student, shared_pos), _gather_tokens(k_teacher, own_pos),
                    _gather_tokens(v_teacher, own_pos), masks, own_pos.to(device), layout.is_visual().to(device))


def workload_rows(w: Workload, rows: list[int]) -> Workload:
    """The same workload restricted to some batch rows (for the memory-hungry reference)."""
    index = torch.tensor(rows, device=w.q_full.device)
    pick = {name: getattr(w, name).index_select(0, index) for name in (
        "q_full", "k_student", "v_student", "k_teacher", "v_teacher", "q_text", "k_shared", "v_shared", "k_own",
        "v_own", "own_index", "is_visual")}
    layout = Layout(w.layout.length, w.layout.prefix, [w.layout.n_visual[r] for r in rows])
    return Workload(layout=layout, masks={k: v.index_select(0, index) for k, v in w.masks.items()}, **pick)


# ----------------------------------------------------------------------------------------------------------------
# Methods: each returns the attention output at the text queries, [B, Hq, Tq, D]
# ----------------------------------------------------------------------------------------------------------------

def run_fused(w: Workload, config=None):
    if config is None:
        return two_source_attention(w.q_text, w.k_shared, w.v_shared, w.k_own, w.v_own, **w.masks,
                                    backend="triton")[0]
    from vlmdistill.kernels import triton_kv_share
    from vlmdistill.kernels.inputs import check_tensors, normalize_masks

    shapes = check_tensors(w.q_text, w.k_shared, w.v_shared, w.k_own, w.v_own)
    masks = normalize_masks(shapes, w.q_text.device, **w.masks).for_kernel()
    return triton_kv_share.two_source_forward(w.q_text, w.k_shared, w.v_shared, w.k_own, w.v_own, masks, shapes,
                                              1.0 / math.sqrt(shapes.head_dim), config=config)[0]


def run_reference(w: Workload):
    return two_source_attention_reference(w.q_text, w.k_shared, w.v_shared, w.k_own, w.v_own, **w.masks)[0]


def _expand_heads(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    return x.repeat_interleave(q_heads // x.shape[1], dim=1)


def full_length_causal_mask(w: Workload) -> torch.Tensor:
    t = w.layout.length
    causal = torch.ones(t, t, dtype=torch.bool, device=w.q_full.device).tril()
    # Materialised per row, as transformers builds it when a batch is padded.
    return causal.expand(w.layout.batch, 1, t, t).contiguous()


def run_merge_sdpa(w: Workload, mask: torch.Tensor | None):
    vis = w.is_visual[:, None, :, None]
    k = torch.where(vis, w.k_student, w.k_teacher)
    v = torch.where(vis, w.v_student, w.v_teacher)
    hq = w.q_full.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(w.q_full, k, v, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(w.q_full, _expand_heads(k, hq), _expand_heads(v, hq), attn_mask=mask)
    return _gather_tokens(out, w.own_index)


MASKED_BIAS = -3.0e4  # exp() of it is 0 in fp32, yet a row with no visible key stays finite (no NaN to merge)


def additive_bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """[B, 1, Tq, Tk] bias (0 or MASKED_BIAS); the row stride is padded to 16 elements, the alignment
    memory-efficient attention wants."""
    b, _, tq, tk = allowed.shape
    padded = torch.zeros(b, 1, tq, -(-tk // 16) * 16, dtype=dtype, device=allowed.device)
    bias = padded[..., :tk]
    bias.masked_fill_(~allowed, MASKED_BIAS)
    return bias


def two_call_biases(w: Workload, dtype):
    m = w.masks
    shared = (m["pos_shared"][:, None, :] <= m["pos_q"][:, :, None]) & m["valid_shared"][:, None, :]
    own = (m["pos_own"][:, None, :] <= m["pos_q"][:, :, None]) & m["valid_own"][:, None, :]
    return additive_bias(shared[:, None], dtype), additive_bias(own[:, None], dtype)


def sdpa_with_lse(q, k, v, bias):
    """Attention output and natural-log lse. CUDA: memory-efficient SDPA kernel (the public SDPA API does not
    return the lse); CPU: explicit math."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    if q.is_cuda:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale + bias.float()
    lse = scores.logsumexp(-1)
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), lse


def merge_by_lse(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a.float() * torch.exp(lse_a - lse)[..., None]
            + out_b.float() * torch.exp(lse_b - lse)[..., None]).to(out_a.dtype)


def run_two_sdpa(w: Workload, biases):
    out_s, lse_s = sdpa_with_lse(w.q_text, w.k_shared, w.v_shared, biases[0])
    out_o, lse_o = sdpa_with_lse(w.q_text, w.k_own, w.v_own, biases[1])
    return merge_by_lse(out_s, lse_s, out_o, lse_o)


def flex_setup(w: Workload, compiled: bool):
    """(flex function, block mask, seconds to build the block mask). The mask is per batch layout, so a training
    step pays it once for all layers."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    m = w.masks
    pos_k = torch.cat([m["pos_shared"], m["pos_own"]], dim=1)
    valid_k = torch.cat([m["valid_shared"], m["valid_own"]], dim=1)
    pos_q = m["pos_q"]

    def visible(b, h, q_idx, kv_idx):
        return valid_k[b, kv_idx] & (pos_k[b, kv_idx] <= pos_q[b, q_idx])

    start = time.perf_counter()
    block_mask = create_block_mask(visible, w.layout.batch, None, pos_q.shape[1], pos_k.shape[1],
                                   device=str(w.q_text.device))
    if w.q_text.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return fn, block_mask, seconds


def run_flex(w: Workload, flex, block_mask):
    k = torch.cat([w.k_shared, w.k_own], dim=2)
    v = torch.cat([w.v_shared, w.v_own], dim=2)
    return flex(w.q_text, k, v, block_mask=block_mask, enable_gqa=True)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def flash_setup(w: Workload):
    """Packed (varlen) copies of the compact tensors, made outside the timed region."""
    def pack(x, valid):  # [B, H, T, D] -> [sum valid, H, D]
        return x.transpose(1, 2)[valid]

    def cu(valid):
        return F.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)

    m = w.masks
    return dict(q=pack(w.q_text, m["valid_own"]), ks=pack(w.k_shared, m["valid_shared"]),
                vs=pack(w.v_shared, m["valid_shared"]), ko=pack(w.k_own, m["valid_own"]),
                vo=pack(w.v_own, m["valid_own"]), cu_q=cu(m["valid_own"]), cu_s=cu(m["valid_shared"]),
                max_q=int(m["valid_own"].sum(1).max()), max_s=int(m["valid_shared"].sum(1).max()))


def run_flash(w: Workload, packed):
    from flash_attn import flash_attn_varlen_func

    p = packed
    out_s, lse_s, _ = flash_attn_varlen_func(p["q"], p["ks"], p["vs"], p["cu_q"], p["cu_s"], p["max_q"], p["max_s"],
                                             causal=False, return_attn_probs=True)
    out_o, lse_o, _ = flash_attn_varlen_func(p["q"], p["ko"], p["vo"], p["cu_q"], p["cu_q"], p["max_q"], p["max_q"],
                                             causal=True, return_attn_probs=True)
    if lse_s.dim() != 2:
        raise RuntimeError(f"unexpected flash-attn varlen lse layout {tuple(lse_s.shape)}")
    merged = merge_by_lse(out_s, lse_s.transpose(0, 1), out_o, lse_o.transpose(0, 1))  # [total, H, D]
    batch, q_heads, n_queries, head_dim = w.q_text.shape
    out = w.q_text.new_zeros(batch, n_queries, q_heads, head_dim)
    out[w.masks["valid_own"]] = merged
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------------

def compare(out: torch.Tensor, ref: torch.Tensor, rows_checked: torch.Tensor) -> float:
    """Max |out - ref| / max |ref| over the query rows in `rows_checked` ([B, Tq] bool)."""
    sel = rows_checked[:, None, :].expand(out.shape[:3])
    diff = (out.float() - ref.float())[sel]
    scale = ref.float()[sel].abs().max().clamp_min(1e-6)
    return float(diff.abs().max() / scale) if diff.numel() else 0.0


def check_methods(w: Workload, methods: dict, tolerance: float) -> dict:
    ref = run_reference(w)
    m = w.masks
    real = m["valid_own"]
    after_image = real & (m["pos_q"] >= torch.tensor([w.layout.prefix + v for v in w.layout.n_visual],
                                                     device=real.device)[:, None])
    results = {}
    for name, fn in methods.items():
        try:
            out = fn(w)
            rows = after_image if name == "d_flash_attn" else real
            err = compare(out, ref, rows)
            results[name] = {"max_rel_error": err, "ok": bool(err < tolerance and math.isfinite(err))}
        except Exception as exc:  # one baseline failing must not hide the others
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


def check_methods_by_row(w: Workload, rows: list[int], methods: dict, tolerance: float) -> dict:
    """`check_methods` one batch row at a time (the reference holds the full score matrix of what it checks);
    a method passes when it passes on every row."""
    merged = {}
    for row in rows:
        for name, res in check_methods(workload_rows(w, [row]), methods, tolerance).items():
            seen = merged.setdefault(name, {"ok": True, "max_rel_error": 0.0})
            seen["ok"] = seen["ok"] and res["ok"]
            if "error" in res:
                seen["error"] = res["error"]
                seen.pop("max_rel_error", None)
            elif "max_rel_error" in seen:
                seen["max_rel_error"] = max(seen["max_rel_error"], res["max_rel_error"])
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

class CudaTimer:
    """Median time from `triton.testing.do_bench` (CUDA events, L2 flushed between runs) and the peak memory a
    call allocates above what was allocated before it (its output included)."""

    def __init__(self, warmup_ms: int, rep_ms: int):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def median_ms(self, fn) -> float:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def extra_peak_mb(self, fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / 2 ** 20


class WallClockTimer:
    """Wall-clock medians and no memory figure: lets the timing and report code run without a GPU (in tests).
    Its numbers say nothing about GPU speed."""

    def __init__(self, repeats: int = 3):
        self.repeats = repeats

    def median_ms(self, fn) -> float:
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    def extra_peak_mb(self, fn) -> float | None:
        return None


def matmul_tflops(dtype, timer: CudaTimer, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = timer.median_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def method_table(w: Workload, *, on_gpu: bool):
    """name -> (callable(workload) for the check, callable() for timing bound to `w`, setup seconds or None)."""
    table = {"fused": (run_fused, lambda: run_fused(w), None)}
    mask = full_length_causal_mask(w)
    table["a_merge_sdpa"] = (lambda x: run_merge_sdpa(x, full_length_causal_mask(x)), lambda: run_merge_sdpa(w, mask),
                             None)
    table["a_merge_causal"] = (lambda x: run_merge_sdpa(x, None), lambda: run_merge_sdpa(w, None), None)
    biases = two_call_biases(w, w.q_text.dtype)
    table["b_two_sdpa"] = (lambda x: run_two_sdpa(x, two_call_biases(x, x.q_text.dtype)),
                           lambda: run_two_sdpa(w, biases), None)
    try:
        flex, block_mask, mask_seconds = flex_setup(w, compiled=on_gpu)

        def check_flex(x):
            f, bm, _ = flex_setup(x, compiled=on_gpu)
            return run_flex(x, f, bm)

        table["c_flex"] = (check_flex, lambda: run_flex(w, flex, block_mask), mask_seconds)
    except Exception as exc:
        table["c_flex"] = (_raiser(exc), _raiser(exc), None)
    if flash_available() and on_gpu:
        packed = flash_setup(w)
        table["d_flash_attn"] = (lambda x: run_flash(x, flash_setup(x)), lambda: run_flash(w, packed), None)
    return table


def _raiser(exc):
    def fail(*_):
        raise exc
    return fail


def check_rows(batch: int) -> list[int]:
    return sorted({0, batch - 1})


def benchmark_length(length: int, args, device, dtype, *, timer=None, matmul_rate: float | None = None) -> dict:
    """Correctness of every method on two batch rows, then (when a timer is given) timings of all of them."""
    on_gpu = device.type == "cuda"
    batch = args.batch or max(1, args.tokens_per_batch // length)
    layout = make_layout(length, batch, args.visual_min, args.visual_max, args.prefix, args.seed)
    w = make_workload(layout, args.q_heads, args.kv_heads, args.head_dim, dtype, device, args.seed)
    flops = 4 * args.head_dim * args.q_heads * layout.visible_pairs()
    record = {"length": length, "batch": batch, "n_visual": layout.n_visual, "n_queries": w.q_text.shape[2],
              "n_shared": w.k_shared.shape[2], "n_own": w.k_own.shape[2], "visible_pairs": layout.visible_pairs(),
              "useful_gflop": flops / 1e9}
    table = method_table(w, on_gpu=on_gpu)
    print(f"[{length}] batch {batch}, visual tokens {min(layout.n_visual)}..{max(layout.n_visual)}: checking "
          f"{', '.join(table)} against the torch reference on rows {check_rows(batch)}", flush=True)
    tolerance = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    record["correctness"] = check_methods_by_row(w, check_rows(batch), {name: fns[0] for name, fns in table.items()},
                                                 tolerance)
    for name, res in record["correctness"].items():
        print(f"  {name:15s} {'ok ' if res['ok'] else 'FAIL'} {res.get('max_rel_error', res.get('error'))}",
              flush=True)
    if timer is None:
        return record
    if not record["correctness"]["fused"]["ok"]:
        record["timings"] = "skipped: the fused kernel failed its correctness check"
        return record
    record["timings"] = time_methods(table, record["correctness"], timer, flops, matmul_rate)
    record["memory"] = memory_summary(w, record["timings"]["fused"])
    if args.sweep:
        record["fused_config_sweep"] = sweep_configs(w, args.head_dim, timer, flops)
    print_timings(record["timings"])
    return record


def time_methods(table: dict, correctness: dict, timer, flops: float, matmul_rate: float | None) -> dict:
    timings = {}
    for name, (_, timed, setup_seconds) in table.items():
        try:
            ms = timer.median_ms(timed)
            timings[name] = {"median_ms": ms, "useful_tflops": flops / (ms * 1e-3) / 1e12,
                             "extra_peak_mb": timer.extra_peak_mb(timed),
                             "verified": correctness.get(name, {}).get("ok", False)}
            if setup_seconds is not None:
                timings[name]["block_mask_ms"] = setup_seconds * 1e3
        except Exception as exc:
            timings[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    fused = timings["fused"]
    if "median_ms" in fused:
        for name, t in timings.items():
            if "median_ms" in t and name != "fused":
                t["fused_speedup"] = t["median_ms"] / fused["median_ms"]
        if matmul_rate:
            fused["fraction_of_matmul_rate"] = fused["useful_tflops"] / matmul_rate
    return timings


def memory_summary(w: Workload, fused_timing: dict) -> dict:
    """Is the fused call's extra memory just its output? A merged K/V (what the kernel avoids) would add at
    least its own size."""
    out_bytes = w.q_text.numel() * w.q_text.element_size() + w.q_text[..., 0].numel() * 4
    merged_kv_bytes = 2 * w.k_student.numel() * w.k_student.element_size()
    extra_mb = fused_timing.get("extra_peak_mb")
    no_merge = None if extra_mb is None else extra_mb * 2 ** 20 < out_bytes + min(merged_kv_bytes, 2 ** 20)
    return {"fused_output_mb": out_bytes / 2 ** 20, "merged_kv_mb": merged_kv_bytes / 2 ** 20,
            "fused_extra_peak_mb": extra_mb, "fused_allocates_no_merged_kv": no_merge}


def print_timings(timings: dict) -> None:
    for name, t in timings.items():
        if "median_ms" not in t:
            print(f"  {name:15s} {t['error']}", flush=True)
            continue
        ratio = f"  fused {t['fused_speedup']:.2f}x faster" if "fused_speedup" in t else ""
        memory = "" if t["extra_peak_mb"] is None else f"  +{t['extra_peak_mb']:8.1f} MB"
        print(f"  {name:15s} {t['median_ms']:8.3f} ms  {t['useful_tflops']:7.2f} TFLOP/s{memory}{ratio}", flush=True)


def sweep_configs(w: Workload, head_dim: int, timer, flops: float) -> list[dict]:
    from vlmdistill.kernels.triton_kv_share import forward_config_candidates

    rows = []
    for config in forward_config_candidates(head_dim):
        try:
            ms = timer.median_ms(lambda config=config: run_fused(w, config))
            rows.append({**asdict(config), "median_ms": ms, "useful_tflops": flops / (ms * 1e-3) / 1e12})
        except Exception as exc:
            rows.append({**asdict(config), "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def evaluate_targets(records: list[dict], matmul_rate: float | None) -> dict:
    """The issue's targets, for the lengths that were measured."""
    by_length = {r["length"]: r["timings"] for r in records if isinstance(r.get("timings"), dict)}
    found = {}
    a4k = by_length.get(4096, {}).get("a_merge_sdpa", {})
    if "fused_speedup" in a4k:
        found["speedup_vs_a_merge_sdpa_at_4096"] = a4k["fused_speedup"]
    b_all = [t["b_two_sdpa"]["fused_speedup"] for t in by_length.values() if "fused_speedup" in t.get("b_two_sdpa", {})]
    if b_all:
        found["speedup_vs_b_two_sdpa"] = min(b_all)
    f8k = by_length.get(8192, {}).get("fused", {})
    if matmul_rate and "fraction_of_matmul_rate" in f8k:
        found["fused_fraction_of_matmul_rate_at_8192"] = f8k["fraction_of_matmul_rate"]
    targets = {k: {"target": TARGETS[k], "measured": v, "met": v >= TARGETS[k]} for k, v in found.items()}
    no_merge = [r["memory"]["fused_allocates_no_merged_kv"] for r in records if "memory" in r]
    if no_merge and None not in no_merge:
        targets["fused_allocates_no_merged_kv"] = {"target": True, "measured": all(no_merge), "met": all(no_merge)}
    return targets


def _correctness_lines(result: dict) -> list[str]:
    lines = ["## Correctness (max error relative to max |reference|, on the checked rows)", "",
             "| length | method | ok | error |", "|---|---|---|---|"]
    for r in result["lengths"]:
        for name, c in r["correctness"].items():
            lines.append(f"| {r['length']} | {name} | {'yes' if c['ok'] else 'NO'} | "
                         f"{c.get('max_rel_error', c.get('error', ''))} |")
    return lines


def _timing_lines(result: dict) -> list[str]:
    timed = [r for r in result["lengths"] if isinstance(r.get("timings"), dict)]
    if not timed:
        return []
    lines = ["## Timings (median; useful TFLOP/s counts only the visible text-query pairs, the same for every "
             "method)", "", "| length | batch | method | ms | TFLOP/s | fused speed-up | extra peak MB | verified |",
             "|---|---|---|---|---|---|---|---|"]
    for r in timed:
        for name, t in r["timings"].items():
            if "median_ms" not in t:
                lines.append(f"| {r['length']} | {r['batch']} | {name} | error: {t['error'][:80]} | | | | |")
                continue
            speed = f"{t['fused_speedup']:.2f}x" if "fused_speedup" in t else "-"
            memory = "-" if t["extra_peak_mb"] is None else f"{t['extra_peak_mb']:.1f}"
            lines.append(f"| {r['length']} | {r['batch']} | {name} | {t['median_ms']:.3f} | {t['useful_tflops']:.2f} "
                         f"| {speed} | {memory} | {'yes' if t['verified'] else 'no'} |")
    sweeps = [r for r in timed if r.get("fused_config_sweep")]
    if sweeps:
        lines += ["", "## Fused kernel configurations", "", "| length | block_m | block_n | warps | stages | ms |",
                  "|---|---|---|---|---|---|"]
        for r in sweeps:
            for c in r["fused_config_sweep"]:
                ms = f"{c['median_ms']:.3f}" if "median_ms" in c else c["error"][:60]
                lines.append(f"| {r['length']} | {c['block_m']} | {c['block_n']} | {c['num_warps']} | "
                             f"{c['num_stages']} | {ms} |")
    return lines


def write_report(out_dir: Path, result: dict) -> None:
    env = result["environment"]
    lines = ["# Two-source attention benchmark", "",
             f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, flash-attn installed: "
             f"{env['flash_attn']}; dtype {result['dtype']}; Hq={result['q_heads']}, Hkv={result['kv_heads']}, "
             f"D={result['head_dim']}.", ""]
    if result["matmul_tflops"] is not None:
        lines += [f"Measured {result['dtype']} matmul rate (8192^3) in this run: {result['matmul_tflops']:.1f} "
                  "TFLOP/s.", ""]
    if not result["gpu"]:
        lines += ["No GPU: correctness smoke only; no GPU timing was taken.", ""]
    lines += _correctness_lines(result)
    timing = _timing_lines(result)
    if timing:
        lines += [""] + timing
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for name, t in result["targets"].items():
            measured = t["measured"] if isinstance(t["measured"], bool) else f"{t['measured']:.3f}"
            lines.append(f"| {name} | >= {t['target']} | {measured} | {'yes' if t['met'] else 'no'} |")
    write_results(out_dir, result, "\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fused two-source attention vs PyTorch baselines.")
    add_out_argument(p, required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--visual-min", type=int, default=65)
    p.add_argument("--visual-max", type=int, default=1105)
    p.add_argument("--prefix", type=int, default=5, help="text tokens before the image")
    p.add_argument("--q-heads", type=int, default=15)
    p.add_argument("--kv-heads", type=int, default=5)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens-per-batch", type=int, default=65536, help="batch = this // length (fills the GPU)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (overrides --tokens-per-batch)")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the kernel-configuration sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny problem sizes (always on without a GPU, where only correctness is checked)")
    return p.parse_args(argv)


def rerun_with_interpreter(argv) -> int:
    """Run this script again in a child process with TRITON_INTERPRET=1: the interpreter only works when the
    variable is set before triton is first imported, and importing vlmdistill has already imported it."""
    target = ["-m", __spec__.name] if __spec__ is not None else [os.path.abspath(__file__)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, *target, *(sys.argv[1:] if argv is None else argv)], env=env)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        return rerun_with_interpreter(argv)
    if not on_gpu:
        print("No GPU: running a tiny CPU correctness smoke through the Triton interpreter; no timings.", flush=True)
        args.smoke = True
        args.dtype = "float32"  # bf16 tl.dot is wrong under the interpreter
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
    if args.smoke:
        args.lengths = [96, 160] if args.lengths == parse_args(["--out", "x"]).lengths else args.lengths
        args.visual_min, args.visual_max = min(args.visual_min, 9), min(args.visual_max, 40)
        args.batch = args.batch or 2
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    import triton

    env = {"device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or 'unknown'})",
           "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "flash_attn": flash_available()}
    print(f"Device: {env['device']}", flush=True)
    timer = CudaTimer(args.warmup_ms, args.rep_ms) if on_gpu else None
    matmul_rate = matmul_tflops(dtype, timer) if on_gpu else None
    if matmul_rate:
        print(f"{args.dtype} matmul rate: {matmul_rate:.1f} TFLOP/s", flush=True)
    records = []
    for length in args.lengths:
        records.append(benchmark_length(length, args, device, dtype, timer=timer, matmul_rate=matmul_rate))
        if on_gpu:
            torch.cuda.empty_cache()
    result = {"gpu": on_gpu, "environment": env, "dtype": args.dtype, "q_heads": args.q_heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "matmul_tflops": matmul_rate,
              "lengths": records, "targets": evaluate_targets(records, matmul_rate) if on_gpu else {},
              "fused_correct": all(r["correctness"]["fused"]["ok"] for r in records)}
    write_report(args.out, result)
    print(f"Wrote {args.out / 'results.json'} and {args.out / 'results.md'}", flush=True)
    return 0 if result["fused_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
