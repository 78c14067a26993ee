"""LinguDistill training step vs the plain fine-tuning step on the same batch, ratios measured in one run.

A LLaVA whose language model is the teacher's size (a copy of the teacher's architecture), half of every
sequence image tokens, every sample distilled. Timed: forward + backward + AdamW step, arms interleaved,
median over steps. Arms: plain fine-tuning; LinguDistill with the text-only teacher pass (kernel "torch",
and "triton" where CUDA is present); LinguDistill with the full-length reference pass.

Peak memory: on CUDA `max_memory_allocated` during a step; on the CPU the peak resident set of one
subprocess per arm (plain vs text-only pass), which includes building the models. The expected overhead is
the teacher's weights plus the stashed K/V of the shared positions.

    python -m vlmdistill.eval.bench.bench_lingudistill [--layers 8 --hidden 256 --batch 4 --seq 288]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def build(args, device, dtype, with_teacher: bool = True):
    """(student LLaVA, teacher Llama or None, batch, image tokens per sample): half of each sequence is image
    placeholder tokens."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    side = int(round((args.seq // 2) ** 0.5))
    image_tokens = side * side
    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=4 * args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**text)).to(device, dtype) if with_teacher else None
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=8 * side, patch_size=8)
    cfg = LlavaConfig(text_config=LlamaConfig(**{**text, "vocab_size": args.vocab + 1}).to_dict(),
                      vision_config=vision.to_dict(), image_token_id=args.vocab, projector_hidden_act="gelu",
                      vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    student = LlavaForConditionalGeneration(cfg).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    ids[:, 4:4 + image_tokens] = args.vocab
    labels = ids.clone()
    labels[:, : 4 + image_tokens + 8] = -100  # image + prompt unsupervised, the rest of the text supervised
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.rand(args.batch, 3, 8 * side, 8 * side, generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return student, teacher, batch, image_tokens


def make_arms(student, teacher, kernels: list[str]):
    import vlmdistill

    arms = {"plain": student}
    for kernel in kernels:
        arms[f"lingudistill text-only ({kernel})"] = ("text_only", kernel)
    arms["lingudistill full-length (reference)"] = ("full_length", "torch")

    def model_for(name):
        spec = arms[name]
        if spec is student:
            return student, None
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, teacher_pass=spec[0],
                                  kernel=spec[1], trust_vocab_prefix=True)
        return wrapped, wrapped

    return list(arms), model_for


def step(model, optimizer, batch, num_items):
    out = model(**batch, num_items_in_batch=num_items) if hasattr(model, "plugin") else model(**batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_arms(args, device, dtype) -> dict:
    import vlmdistill

    student, teacher, batch, image_tokens = build(args, device, dtype)
    kernels = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    names, model_for = make_arms(student, teacher, kernels)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    times = {n: [] for n in names}
    peaks = {}
    for rep in range(args.warmup + args.steps):
        for name in names:
            model, wrapped = model_for(name)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step(model, optimizer, batch, num_items)
            sync(device)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() - base)
            if wrapped is not None:
                vlmdistill.unwrap(wrapped)
    median = {n: statistics.median(t) for n, t in times.items()}
    return {"image_tokens": image_tokens, "seconds": median,
            "ratio": {n: median[n] / median["plain"] for n in names}, "cuda_step_peak_bytes": peaks,
            "stash_bytes": stash_bytes(args, image_tokens, dtype),
            "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}


def stash_bytes(args, image_tokens: int, dtype) -> dict:
    head_dim = args.hidden // args.heads
    one_layer = 2 * args.batch * args.kv_heads * image_tokens * head_dim * torch.tensor([], dtype=dtype).element_size()
    return {"one_layer": one_layer, "all_layers": one_layer * args.layers}


def peak_rss_of_arm(arm: str, argv: list[str]) -> dict:
    """Resident memory of a fresh process that builds the models of `arm` and runs three steps: before the
    last step, and the peak during it (bytes)."""
    cmd = [sys.executable, "-m", "vlmdistill.eval.bench.bench_lingudistill", *argv, "--memory-arm", arm]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_arm(args, arm: str) -> dict:
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    student, teacher, batch, _ = build(args, device, dtype, with_teacher=arm != "plain")
    if arm == "plain":
        model = student
    else:
        import vlmdistill

        model = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, teacher_pass=arm,
                                trust_vocab_prefix=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    for _ in range(2):  # optimizer state and allocator caches settle
        step(model, optimizer, batch, num_items)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak resident set (VmHWM) of this process
        fh.write("5")
    step(model, optimizer, batch, num_items)
    return {"before": before * 1024, "peak": _proc_status_kib("VmHWM") * 1024}


def report(result: dict, args, out_dir: str | None) -> str:
    mb = 1 / 2**20
    lines = [f"LLaVA student, LM {args.layers} layers × {args.hidden} ({args.heads} q / {args.kv_heads} kv heads), "
             f"vocab {args.vocab}; teacher the same size; batch {args.batch} × {args.seq} tokens, "
             f"{result['image_tokens']} image tokens per sample; {args.dtype} on {result['device']}", "",
             "| step | median seconds | × plain |", "|---|---|---|"]
    for name, sec in result["seconds"].items():
        lines.append(f"| {name} | {sec:.4f} | {result['ratio'][name]:.3f} |")
    lines += ["", f"teacher weights: {result['teacher_bytes'] * mb:.1f} MiB; stashed shared K/V: one layer "
                  f"{result['stash_bytes']['one_layer'] * mb:.2f} MiB, all layers "
                  f"{result['stash_bytes']['all_layers'] * mb:.2f} MiB"]
    if result.get("cuda_step_peak_bytes"):
        plain = result["cuda_step_peak_bytes"]["plain"]
        for name, peak in result["cuda_step_peak_bytes"].items():
            lines.append(f"- step peak above resident, {name}: {peak * mb:.1f} MiB ({(peak - plain) * mb:+.1f} MiB)")
    if result.get("rss"):
        rss = result["rss"]
        lines.append("- resident memory (one process per arm; before the measured step / peak during it / "
                     "peak minus the plain arm's peak):")
        for arm in rss:
            lines.append(f"  - {arm}: {rss[arm]['before'] * mb:.0f} / {rss[arm]['peak'] * mb:.0f} MiB / "
                         f"{(rss[arm]['peak'] - rss['plain']['peak']) * mb:+.0f} MiB")
        lines.append(f"  - expected overhead: teacher weights {result['teacher_bytes'] * mb:.1f} MiB + one layer's "
                     f"shared K/V {result['stash_bytes']['one_layer'] * mb:.2f} MiB (all layers when copied: "
                     f"{result['stash_bytes']['all_layers'] * mb:.2f} MiB)")
    text = "\n".join(lines)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench_lingudistill.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        with open(os.path.join(out_dir, "bench_lingudistill.md"), "w") as fh:
            fh.write(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=288, help="tokens per sample; half are image tokens")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS subprocesses")
    p.add_argument("--out", default=None, help="folder for bench_lingudistill.{json,md}")
    p.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_arm:
        print(json.dumps(memory_arm(args, args.memory_arm)))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = time_arms(args, device, getattr(torch, args.dtype))
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)"
    if device.type == "cpu" and not args.no_memory:
        child = [a for a in argv if a != "--no-memory"]
        result["rss"] = {arm: peak_rss_of_arm(arm, child) for arm in ("plain", "text_only", "full_length")}
    print(report(result, args, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
