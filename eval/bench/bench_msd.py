"""Cost of momentum self-distillation, as ratios against baselines timed in the same process.

    python -m vlmdistill.eval.bench.bench_msd [--device cpu|cuda] [--repeats 7] [--quick]

1. EMA update of a ViT-B/16-sized parameter list (~86M parameters): the fused multi-tensor update of
   `vlmdistill.teachers.EMATeacher` (one `_foreach_lerp_`) against per-parameter Python loops, ALBEF's
   (`p_t.data = p_t.data * m + p_s.data * (1 - m)`) and an in-place one (`p_t.mul_(m).add_(p_s, alpha=1 - m)`).
   Target: >= 3x faster than the per-parameter loop.
2. Training cost per micro-batch: `msd_step` with M micro-batches of b (teacher pass over the window,
   student forward/backward against M·b keys + the queue, optimizer step, EMA update, enqueue) against
   the plain CLIP step with the same micro-batch (forward/backward with the model's own loss, optimizer
   step every M micro-batches). Target: <= 1.4x (one extra no-grad forward on top of forward+backward).
Timings alternate between the variants so that machine noise hits them alike; medians are printed.
3. Tensor memory of one optimizer step (peak of live bytes allocated by torch above the start, from the
   profiler's memory events): plain b × M accumulation, `msd_step` b × M, and plain CLIP on one batch of M·b.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from vlmdistill.teachers import EMATeacher

from .output import add_out_argument, write_results


# ----------------------------------------------------------------------------- 1. EMA update
def vit_b16_shapes(depth: int = 12, width: int = 768, patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT-B/16 image tower without classifier head (85.8M parameters)."""
    shapes = [(width, 3, patch, patch), (width,), (1, 1, width), (1, tokens, width)]
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


class ParameterStack(nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        self.tensors = nn.ParameterList([nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_ema(device: str, repeats: int, quick: bool) -> dict:
    shapes = vit_b16_shapes(depth=2 if quick else 12)
    student = ParameterStack(shapes, device)
    ema = EMATeacher(student)
    teacher_params = list(ema.module.parameters())
    student_params = list(student.parameters())
    momentum = 0.995

    @torch.no_grad()
    def albef_loop():
        for t, s in zip(teacher_params, student_params):
            t.data = t.data * momentum + s.data * (1.0 - momentum)

    @torch.no_grad()
    def inplace_loop():
        for t, s in zip(teacher_params, student_params):
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)

    variants = {"fused (EMATeacher.update)": lambda: ema.update(momentum),
                "per-parameter loop, ALBEF style": albef_loop,
                "per-parameter loop, in place": inplace_loop}
    times = {name: [] for name in variants}
    for fn in variants.values():   # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn, device))
    medians = {name: statistics.median(v) for name, v in times.items()}
    fused = medians["fused (EMATeacher.update)"]
    return {"parameters": sum(p.numel() for p in student_params), "tensors": len(student_params),
            "median_ms": {k: v * 1e3 for k, v in medians.items()},
            "speedup_vs_albef_loop": medians["per-parameter loop, ALBEF style"] / fused,
            "speedup_vs_inplace_loop": medians["per-parameter loop, in place"] / fused}


# ----------------------------------------------------------------------------- 2. training step
def _clip(args, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    heads = max(1, args.width // 64)
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         max_position_embeddings=args.text_len,
                         eos_token_id=999, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                           num_attention_heads=heads, image_size=args.image, patch_size=args.patch),
        projection_dim=args.width)
    return CLIPModel(config).to(args.device)


def _batch(n: int, args, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 998, (n, args.text_len), generator=g)
    ids[:, -1] = 999
    return {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device),
            "pixel_values": torch.randn(n, 3, args.image, args.image, generator=g).to(args.device)}


def allocator_peak_mb(fn) -> float:
    """Peak of torch's live allocations during `fn()` above their level at the start (CPU profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.profiler.function_events, key=lambda e: e.time_range.start):
        # "[memory]" events are frees outside any op; op events carry their own allocations and frees.
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def bench_step(args) -> dict:
    import vlmdistill
    from vlmdistill.plugins.msd import msd_step

    b, m = args.micro_batch, args.accumulation
    plain = _clip(args)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    wrapped = vlmdistill.wrap(_clip(args), plugin="msd", queue_size=args.queue, alpha_warmup_steps=0)
    msd_opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    plain.train()
    wrapped.train()
    batches = [_batch(b * m, args, seed) for seed in range(4)]

    def plain_step(batch):
        for start in range(0, b * m, b):
            micro = {k: v[start:start + b] for k, v in batch.items()}
            (plain(**micro, return_loss=True).loss / m).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def msd(batch):
        msd_step(wrapped, msd_opt, batch, b)

    times = {"plain": [], "msd": []}
    for i in range(2):   # warm-up, and fill the queue
        plain_step(batches[i])
        msd(batches[i])
    for i in range(args.repeats):
        batch = batches[i % len(batches)]
        times["plain"].append(_timed(lambda batch=batch: plain_step(batch), args.device) / m)
        times["msd"].append(_timed(lambda batch=batch: msd(batch), args.device) / m)
    plain_ms, msd_ms = (statistics.median(times[k]) * 1e3 for k in ("plain", "msd"))
    result = {"micro_batch": b, "accumulation": m, "queue": args.queue,
              "parameters": sum(p.numel() for p in plain.parameters()),
              "plain_ms_per_micro_batch": plain_ms, "msd_ms_per_micro_batch": msd_ms, "ratio": msd_ms / plain_ms}
    if args.device == "cpu" and m > 1:

        def big_step():
            plain(**batches[0], return_loss=True).loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        result["allocator_peak_mb"] = {"plain b x M": allocator_peak_mb(lambda: plain_step(batches[0])),
                                       "msd b x M": allocator_peak_mb(lambda: msd(batches[0])),
                                       "plain M·b": allocator_peak_mb(big_step)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--queue", type=int, default=4096)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.width, args.layers, args.image, args.micro_batch, args.queue, args.repeats = 64, 1, 32, 8, 64, 2
    results = {"device": args.device, "torch_threads": torch.get_num_threads(),
               "ema": bench_ema(args.device, args.repeats, args.quick), "steps": []}
    ema = results["ema"]
    lines = []

    def say(line: str) -> None:  # printed, and kept for results.md
        lines.append(line)
        print(line)

    say(f"EMA update, {ema['parameters'] / 1e6:.1f}M parameters in {ema['tensors']} tensors ({args.device}):")
    for name, ms in ema["median_ms"].items():
        say(f"  {name:34s} {ms:9.2f} ms")
    say(f"  fused speed-up: {ema['speedup_vs_albef_loop']:.2f}x vs ALBEF loop, "
        f"{ema['speedup_vs_inplace_loop']:.2f}x vs in-place loop (target >= 3x)")
    for accumulation in args.accumulation:
        step_args = argparse.Namespace(**{**vars(args), "accumulation": accumulation})
        step = bench_step(step_args)
        results["steps"].append(step)
        say(f"Step per micro-batch of {step['micro_batch']} (M = {accumulation}, K = {step['queue']}, "
            f"{step['parameters'] / 1e6:.1f}M-parameter CLIP): plain {step['plain_ms_per_micro_batch']:.1f} ms, "
            f"msd {step['msd_ms_per_micro_batch']:.1f} ms, ratio {step['ratio']:.2f}x (target <= 1.4x)")
        if "allocator_peak_mb" in step:
            say("  tensor memory of one optimizer step (MB above start): " +
                ", ".join(f"{k} {v:.1f}" for k, v in step["allocator_peak_mb"].items()))
    write_results(args.out, results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
