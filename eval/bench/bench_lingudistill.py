"""LinguDistill training step vs the plain fine-tuning step on the same batch, ratios measured in one run, printed
beside the floor computed from the shapes.

Models: `--preset smolvlm-256m` / `smollm2-360m-vlm` (a SmolVLM-class student of real size with random weights
and its text-only teacher; batch 2 x 600 tokens with 1 and 5 images, 150 supervised tokens per row; see
`presets.py`), or the default toy LLaVA (`--layers/--hidden/...`: half of every sequence image tokens). Every
sample is distilled. Timed: forward + backward + AdamW step, arms interleaved (rotating order), the ratio to the
plain step taken per repetition; median and range. Arms: plain fine-tuning; LinguDistill with the text-only
teacher pass (kernel "torch", and "triton" where CUDA is present); the full-length reference pass (toy default).

`--teacher-pass` also times the teacher pass alone against a plain no-grad forward of the same teacher over
the same tokens (each row's queried text tokens, at the same positions); `--breakdown` the CPU seconds of each
phase of both steps.

Peak memory: on CUDA `max_memory_allocated` during a step; on the CPU the peak resident set of one subprocess
per arm. Expected overhead: the teacher's weights plus the stashed student K/V (none when the student's SDPA
keeps those tensors for its backward anyway).

    python -m vlmdistill.eval.bench.bench_lingudistill --preset smolvlm-256m [--autocast bfloat16]
    python -m vlmdistill.eval.bench.bench_lingudistill [--layers 8 --hidden 256 --batch 4 --seq 288]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from . import floor as flops
from .output import add_out_argument, write_results
from .steps import (Arm, autocast, compile_layers, cuda_peak_lines, cuda_step_peak, measure_rss, ratio_text,
                    rss_in_subprocess, time_interleaved, weight_bytes)

MODULE = "vlmdistill.eval.bench.bench_lingudistill"


@dataclasses.dataclass
class Setup:
    student: Any
    teacher: Any
    batch: dict
    images: int
    shared_ids: list[int]           # visual and structure ids (the config's image id included)
    teacher_vocab: int
    wrap_kwargs: dict
    describe: str


def build(args, device, dtype, with_teacher: bool = True) -> Setup:
    if args.preset:
        return _build_preset(args, device, dtype, with_teacher)
    return _build_toy(args, device, dtype, with_teacher)


def _build_preset(args, device, dtype, with_teacher) -> Setup:
    from .presets import get_preset, make_batch, shared_token_ids, smolvlm_student, text_teacher

    p = get_preset(args.preset)
    student = smolvlm_student(p, device=device, dtype=dtype)
    teacher = text_teacher(p, device=device, dtype=dtype) if with_teacher else None
    extra = shared_token_ids(p)
    return Setup(student, teacher, make_batch(p, device=device, dtype=dtype), sum(p.images_per_row),
                 extra + [p.image_token_id], p.teacher_vocab,
                 dict(trust_vocab_prefix=True, extra_shared_token_ids=extra),
                 f"preset {p.name}: SmolVLM-class student, text {p.layers} layers x {p.hidden} ({p.heads} q / "
                 f"{p.kv_heads} kv heads), vocab {p.vocab} (teacher {p.teacher_vocab}); vision {p.vision_layers} x "
                 f"{p.vision_hidden} at {p.image_size} px; batch {p.batch} x {p.seq} tokens, "
                 f"{'/'.join(map(str, p.images_per_row))} images x {p.image_tokens} tokens, {p.supervised} "
                 f"supervised per row")


def _build_toy(args, device, dtype, with_teacher) -> Setup:
    """A LLaVA whose LM has the teacher's architecture; half of each sequence is image placeholder tokens."""
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
    return Setup(student, teacher, batch, args.batch, [args.vocab], args.vocab, dict(trust_vocab_prefix=True),
                 f"toy LLaVA student, LM {args.layers} layers x {args.hidden} ({args.heads} q / {args.kv_heads} kv "
                 f"heads), vocab {args.vocab}; teacher the same size; batch {args.batch} x {args.seq} tokens, "
                 f"{image_tokens} image tokens per sample")


def step_floor(setup: Setup) -> dict:
    """The floor from the shapes: 1 + teacher FLOPs needed / student forward+backward FLOPs."""
    student = flops.vlm_student(setup.student, setup.batch, images=setup.images)
    need = flops.lingudistill_teacher_needs(setup.batch, setup.shared_ids, setup.teacher_vocab)
    teacher = flops.decoder(setup.teacher.config, tokens=need["tokens"], pairs=need["pairs"],
                            head_rows=need["head_rows"])
    return {"floor": flops.step_floor(teacher, student), "student_training_flops": student.training,
            "teacher_forward_flops": teacher.forward, "teacher_tokens": need["tokens"],
            "teacher_head_rows": need["head_rows"]}


def wrap(setup: Setup, teacher_pass: str, kernel: str):
    import vlmdistill

    return vlmdistill.wrap(setup.student, plugin="lingudistill", teacher=setup.teacher, teacher_pass=teacher_pass,
                           kernel=kernel, **setup.wrap_kwargs)


ARMS = {"torch": ("text_only", "torch"), "triton": ("text_only", "triton"), "full_length": ("full_length", "torch")}
ARM_NAMES = {"plain": "plain", "torch": "lingudistill text-only (torch)", "triton": "lingudistill text-only (triton)",
             "full_length": "lingudistill full-length (reference)"}


def step_fn(setup: Setup, arm: str, optimizer, num_items: int, device, amp: str | None) -> Arm:
    """One training step of an arm; the same student serves every arm, wrapped and unwrapped around the step
    (outside the timed region)."""
    import vlmdistill

    holder: dict = {}

    def run():
        model = holder.get("model", setup.student)
        with autocast(device, amp):
            out = model(**setup.batch, num_items_in_batch=num_items) if arm != "plain" else model(**setup.batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if arm == "plain":
        return Arm(run)
    return Arm(run, enter=lambda: holder.update(model=wrap(setup, *ARMS[arm])),
               exit=lambda: vlmdistill.unwrap(holder.pop("model")))


def stash_info(setup: Setup) -> dict:
    """How the student's K/V reach the teacher on this batch (held by reference or copied) and the bytes a copy
    of every layer's shared positions takes."""
    import vlmdistill

    wrapped = wrap(setup, "text_only", "torch")
    try:
        plugin = wrapped.plugin
        plan = plugin.plan(dict(setup.batch), {})
        plugin._student_forward(setup.student, dict(setup.batch), plan.state)
        key, _, compact = plan.state.stash[0]
        layers = len(plan.state.stash)
        ns = plan.state.layout.shared_offsets[-1]
        per_layer = 2 * key.shape[1] * ns * key.shape[-1] * key.element_size()
        return {"mode": "compact copy" if compact else "held by reference", "all_layers_bytes": per_layer * layers,
                "held_bytes": per_layer * layers if compact else 0}
    finally:
        setup.student.zero_grad(set_to_none=True)
        vlmdistill.unwrap(wrapped)


def _queried_rows(setup: Setup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per distilled row, from the batch alone: the tokens the teacher reads and their positions."""
    ids, labels = setup.batch["input_ids"], setup.batch["labels"]
    shared = torch.isin(ids, torch.tensor(setup.shared_ids, device=ids.device)) | (ids >= setup.teacher_vocab)
    rows = []
    for b in range(ids.shape[0]):
        distilled = flops.supervised_rows(labels)[b] & ~shared[b]
        last = int(distilled.nonzero().max())
        index = (~shared[b, :last + 1]).nonzero().squeeze(1)
        rows.append((ids[b, index][None], index[None]))
    return rows


def teacher_pass_ratio(setup: Setup, device, amp: str | None, repeats: int) -> dict:
    """The teacher pass as the plugin runs it (after a student forward with autograd) vs a plain no-grad forward of
    the teacher over each row's queried tokens (its own attention, causal over those tokens only)."""
    import vlmdistill

    wrapped = wrap(setup, "text_only", "torch")
    plugin = wrapped.plugin
    inputs = dict(setup.batch)
    try:
        with autocast(device, amp):
            plan = plugin.plan(inputs, {})
            plugin._student_forward(setup.student, inputs, plan.state)
            rows = _queried_rows(setup)

            def teacher_pass():
                plan.state.attention.clear()  # masks are rebuilt as in a real step
                plugin._teacher_hidden(plan, inputs["input_ids"])

            def plain():
                with torch.no_grad():
                    for tokens, positions in rows:
                        setup.teacher(input_ids=tokens, position_ids=positions, logits_to_keep=1)

            result = time_interleaved({"plain": plain, "pass": teacher_pass}, steps=repeats, warmup=1,
                                      device=device)
    finally:
        setup.student.zero_grad(set_to_none=True)
        vlmdistill.unwrap(wrapped)
    return {"wall": result["ratio"]["pass"], "cpu": result["ratio_cpu"]["pass"],
            "median_wall_s": result["median_wall_s"], "median_cpu_s": result["median_cpu_s"]}


PHASES = ("plan", "student forward", "teacher pass", "loss (CE + KD)", "backward", "optimizer")


def step_breakdown(setup: Setup, device, amp: str | None, repeats: int) -> dict:
    """CPU seconds of each phase of the plain and the wrapped step (median over `repeats`, after one warm-up):
    where the distillation's extra time goes. The plain step's forward includes its own CE loss."""
    import statistics
    import time

    import vlmdistill

    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-5)
    num_items = int((setup.batch["labels"][:, 1:] != -100).sum())
    times: dict[str, dict[str, list[float]]] = {"plain": {}, "lingudistill": {}}

    def timed(arm, phase, fn):
        def run(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                times[arm].setdefault(phase, []).append(time.process_time() - start)
        return run

    def step(arm, model):
        with autocast(device, amp):
            forward = (timed(arm, "student forward", model) if arm == "plain"
                       else lambda **kw: model(**kw, num_items_in_batch=num_items))
            loss = forward(**setup.batch).loss
        timed(arm, "backward", loss.backward)()
        timed(arm, "optimizer", optimizer.step)()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(repeats + 1):
        step("plain", setup.student)
        wrapped = wrap(setup, "text_only", "torch")  # per step, as the timed arms do: the plain step runs unwrapped
        plugin = wrapped.plugin
        for name, method in (("plan", "plan"), ("student forward", "_student_forward"),
                             ("teacher pass", "_teacher_hidden"), ("loss (CE + KD)", "_loss_sums")):
            setattr(plugin, method, timed("lingudistill", name, getattr(plugin, method)))
        try:
            step("lingudistill", wrapped)
        finally:
            vlmdistill.unwrap(wrapped)
    return {arm: {phase: statistics.median(v[1:]) for phase, v in phases.items()} for arm, phases in times.items()}


def breakdown_lines(breakdown: dict) -> list[str]:
    plain, ours = breakdown["plain"], breakdown["lingudistill"]
    lines = ["", "CPU seconds per phase (median; the plain forward includes its CE loss):", "",
             "| phase | plain | lingudistill |", "|---|---|---|"]
    for phase in PHASES:
        lines.append(f"| {phase} | {plain[phase]:.3f} | {ours[phase]:.3f} |" if phase in plain else
                     f"| {phase} | | {ours[phase]:.3f} |")
    lines.append(f"| sum of the phases | {sum(plain.values()):.3f} | {sum(ours.values()):.3f} |")
    return lines


def compiled_arms(setup: Setup, args, num_items: int, device) -> dict:
    """`--compile`: a copy of the student as the plain arm and the student wrapped once (no wrap per step: a new
    attention name would recompile), each with its decoder / encoder layers compiled, and the teacher's too."""
    import copy

    plain = copy.deepcopy(setup.student)
    wrapped = wrap(setup, "text_only", args.kernel)
    for model in (plain, setup.student, setup.teacher):
        compile_layers(model, backend=args.compile_backend)

    def arm(model, params):
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def run():
            with autocast(device, args.autocast):
                out = model(**setup.batch, num_items_in_batch=num_items) if model is wrapped else model(**setup.batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Arm(run)

    return {"plain (compiled)": arm(plain, plain.parameters()),
            f"lingudistill text-only ({args.kernel}, compiled)": arm(wrapped, setup.student.parameters())}


def time_arms(args, device, dtype) -> dict:
    setup = build(args, device, dtype)
    num_items = int((setup.batch["labels"][:, 1:] != -100).sum())
    result = {"setup": setup.describe, "floor": step_floor(setup), "teacher_bytes": weight_bytes(setup.teacher),
              "stash": stash_info(setup)}
    if args.compile:
        steps = compiled_arms(setup, args, num_items, device)
    else:
        arms = args.arms or (["plain", "torch"] + (["triton"] if device.type == "cuda" else [])
                             + ([] if args.preset else ["full_length"]))
        optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-5)
        steps = {ARM_NAMES[a]: step_fn(setup, a, optimizer, num_items, device, args.autocast) for a in arms}

    def progress(rep, this):
        print(f"  repetition {rep}: " + ", ".join(f"{n} {w:.2f} s ({c:.2f} s CPU)" for n, (w, c) in this.items()),
              flush=True)

    result["timing"] = time_interleaved(steps, steps=args.steps, warmup=args.warmup, device=device,
                                        baseline=next(iter(steps)), on_step=progress)
    if device.type == "cuda":
        result["cuda_step_peak_bytes"] = {name: cuda_step_peak(fn) for name, fn in steps.items()}
    if args.teacher_pass and not args.compile:
        result["teacher_pass"] = teacher_pass_ratio(setup, device, args.autocast, args.steps)
    if args.breakdown and not args.compile:
        result["breakdown"] = step_breakdown(setup, device, args.autocast, args.steps)
    return result


def memory_arm(args, arm: str) -> dict:
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    setup = build(args, device, dtype, with_teacher=arm != "plain")
    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-5)
    num_items = int((setup.batch["labels"][:, 1:] != -100).sum())
    return measure_rss(step_fn(setup, arm, optimizer, num_items, device, args.autocast))


def report(result: dict, args) -> str:
    mb = 1 / 2 ** 20
    timing, fl = result["timing"], result["floor"]
    amp = f", {args.autocast} autocast" if args.autocast else ""
    lines = [f"{result['setup']}; weights {args.dtype}{amp}; {result['device']}; interleaved, "
             f"{args.steps} repetitions after {args.warmup} warm-up", "",
             f"floor from the shapes: 1 + teacher {fl['teacher_forward_flops'] / 1e9:.1f} GFLOP "
             f"({fl['teacher_tokens']} tokens, head on {fl['teacher_head_rows']} rows) / student forward+backward "
             f"{fl['student_training_flops'] / 1e9:.1f} GFLOP = **{fl['floor']:.3f}**", "",
             "| step | median s (wall) | x plain (wall) [range] | x plain (CPU time) [range] | / floor (wall, CPU) |",
             "|---|---|---|---|---|"]
    for name in timing["arms"]:
        r = timing["ratio"][name]
        lines.append(f"| {name} | {timing['median_wall_s'][name]:.3f} | {ratio_text(r)} | "
                     f"{ratio_text(timing['ratio_cpu'][name])} | {r['median'] / fl['floor']:.3f}, "
                     f"{timing['ratio_cpu'][name]['median'] / fl['floor']:.3f} |")
    stash = result["stash"]
    expected = result["teacher_bytes"] + stash["held_bytes"]
    lines += ["", f"teacher weights {result['teacher_bytes'] * mb:.1f} MiB; student K/V for the teacher: "
                  f"{stash['mode']} ({stash['held_bytes'] * mb:.1f} MiB held; a copy of every layer's shared "
                  f"positions would be {stash['all_layers_bytes'] * mb:.1f} MiB); expected extra memory "
                  f"{expected * mb:.1f} MiB (target <= {1.05 * expected * mb:.1f} MiB)"]
    if result.get("cuda_step_peak_bytes"):
        lines += cuda_peak_lines(result["cuda_step_peak_bytes"], result["teacher_bytes"], expected)
    if result.get("rss"):
        rss = result["rss"]
        lines.append("- resident memory (one process per arm; before the measured step / peak during it / peak "
                     "minus the plain arm's peak):")
        for arm, value in rss.items():
            lines.append(f"  - {ARM_NAMES[arm]}: {value['before'] * mb:.0f} / {value['peak'] * mb:.0f} MiB / "
                         f"{(value['peak'] - rss['plain']['peak']) * mb:+.0f} MiB")
    if result.get("teacher_pass"):
        tp = result["teacher_pass"]
        lines += ["", f"teacher pass vs a plain forward of the teacher over the same tokens: x{ratio_text(tp['wall'])}"
                      f" wall, x{ratio_text(tp['cpu'])} CPU time (target <= 1.10; median "
                      f"{tp['median_wall_s']['pass']:.3f} s vs {tp['median_wall_s']['plain']:.3f} s; CPU time "
                      f"{tp['median_cpu_s']['pass']:.3f} s vs {tp['median_cpu_s']['plain']:.3f} s)"]
    if result.get("breakdown"):
        lines += breakdown_lines(result["breakdown"])
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="smolvlm-256m, smollm2-360m-vlm or tiny (default: the toy LLaVA)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=288, help="tokens per sample; half are image tokens")
    p.add_argument("--steps", type=int, default=6, help="measured repetitions (one step of every arm each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="weights")
    p.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="mixed precision")
    p.add_argument("--arms", default=None, type=lambda s: s.split(","),
                   help=f"comma-separated subset of plain,{','.join(ARMS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-pass", action="store_true", help="also time the teacher pass against a plain forward")
    p.add_argument("--breakdown", action="store_true", help="also the CPU seconds of each phase of the plain and "
                   "the wrapped step (where the extra time goes)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoder / encoder layers (student, its plain copy, teacher) with torch.compile")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"], help="two-source attention "
                   "of the compiled arm")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS subprocesses")
    add_out_argument(p)
    p.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arms and (args.arms[0] != "plain" or set(args.arms[1:]) - set(ARMS)):
        p.error(f"--arms must start with plain and name arms among {sorted(ARMS)}; got {args.arms}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_arm:
        print(json.dumps(memory_arm(args, args.memory_arm)))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = time_arms(args, device, getattr(torch, args.dtype))
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    if device.type == "cpu" and not args.no_memory:
        child = [a for a in argv if a not in ("--no-memory", "--teacher-pass", "--breakdown")]
        arms = [a for a in (args.arms or ["plain", "torch"] + ([] if args.preset else ["full_length"]))]
        result["rss"] = {arm: rss_in_subprocess(MODULE, child, arm) for arm in arms}
    text = report(result, args)
    print(text)
    write_results(args.out, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
