"""Cost of `wrap(..., plugin="kd")`: a training step against the plain student step, same batch, ratios measured
in this process (arms interleaved, rotating order, ratio per repetition; median and range), printed beside the
floor computed from the shapes (1 + the teacher's forward FLOPs / the student's forward + backward FLOPs).

    python -m vlmdistill.eval.bench.bench_kd [--preset smolvlm-256m] [--autocast bfloat16] [--steps 10]

Models: the default is a Llama student and a teacher of the same size (text only); `--preset NAME` a real-size
SmolVLM-class VLM teacher (`presets.py`) and a student with half its decoder layers, on the preset's batch
(images included: the teacher sees them too).

Memory: the bytes autograd keeps for backward are counted exactly (saved-tensor hooks), so "no retained teacher
activations" is checked, not assumed; peak resident memory per arm in one subprocess each on the CPU,
`max_memory_allocated` on CUDA. Expected overhead: the teacher's weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import Any

import torch

from . import floor as flops
from .output import add_out_argument, write_results
from .steps import (Arm, autocast, compile_layers, cuda_peak_lines, cuda_step_peak, measure_rss, ratio_text,
                    rss_in_subprocess, time_interleaved, weight_bytes)

MODULE = "vlmdistill.eval.bench.bench_kd"


@dataclasses.dataclass
class Setup:
    student: Any
    teacher: Any
    batch: dict
    images: int
    describe: str


def _llama(seed: int, args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        max_position_embeddings=args.seq, tie_word_embeddings=False)).to(device)


def build(args, device, with_teacher: bool = True) -> Setup:
    if args.preset:
        from .presets import get_preset, make_batch, smolvlm_student

        p = get_preset(args.preset)
        student = smolvlm_student(p, layers=max(1, p.layers // 2), seed=0, device=device)
        teacher = smolvlm_student(p, seed=1, device=device) if with_teacher else None
        return Setup(student, teacher, make_batch(p, device=device), sum(p.images_per_row),
                     f"preset {p.name}: SmolVLM-class teacher {p.layers} layers x {p.hidden}, student "
                     f"{max(1, p.layers // 2)} layers; vocab {p.vocab}; batch {p.batch} x {p.seq} tokens, "
                     f"{'/'.join(map(str, p.images_per_row))} images, {p.supervised} supervised per row")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return Setup(_llama(0, args, device), _llama(1, args, device) if with_teacher else None, batch, 0,
                 f"Llama student and teacher, {args.layers} layers x {args.hidden}, vocab {args.vocab}; batch "
                 f"{args.batch} x {args.seq}")


def step_floor(setup: Setup) -> dict:
    """1 + the teacher's forward (its LM head only at the distilled rows) / the student's forward + backward."""
    rows = int(flops.supervised_rows(setup.batch["labels"]).sum())
    b, t = setup.batch["input_ids"].shape
    pairs = flops.causal_pairs([t] * b)
    if setup.images:
        student = flops.vlm_student(setup.student, setup.batch, images=setup.images)
        teacher = flops.vision_tower(setup.teacher.config, setup.images) + flops.decoder(
            setup.teacher.config.get_text_config(), tokens=b * t, pairs=pairs, head_rows=rows)
    else:
        student = flops.lm_student(setup.student.config, setup.batch)
        teacher = flops.decoder(setup.teacher.config, tokens=b * t, pairs=pairs, head_rows=rows)
    return {"floor": flops.step_floor(teacher, student), "student_training_flops": student.training,
            "teacher_forward_flops": teacher.forward}


class SavedBytes:
    """Bytes of all tensors autograd saves for backward while active (distinct storages)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def make_arms(setup: Setup, args, device) -> dict:
    """The plain student's step and the same student's step wrapped by kd (wrapped and unwrapped around it,
    outside the timed region), sharing one optimizer. Each takes an optional `SavedBytes` counter."""
    import vlmdistill

    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-4)
    holder: dict = {}

    def run(counter: SavedBytes | None = None):
        train_step(holder.get("model", setup.student), setup.batch, optimizer, device, args.autocast, counter)

    def enter():
        holder["model"] = vlmdistill.wrap(setup.student, plugin="kd", teacher=setup.teacher, alpha=0.5,
                                          temperature=2.0)

    return {"plain": Arm(run), "kd": Arm(run, enter=enter, exit=lambda: vlmdistill.unwrap(holder.pop("model")))}


def train_step(model, batch: dict, optimizer, device, dtype: str | None, counter: SavedBytes | None = None) -> None:
    """One forward + backward + optimizer step; `counter` (when given) counts the bytes saved for backward."""
    hooks = (torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t) if counter is not None
             else contextlib.nullcontext())
    with autocast(device, dtype), hooks:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compiled_arms(setup: Setup, args, device) -> dict:
    """`--compile`: a copy of the student as the plain arm and the student wrapped once (no wrap per step), each
    with its decoder / encoder layers compiled, and the teacher's too."""
    import copy

    import vlmdistill

    plain = copy.deepcopy(setup.student)
    wrapped = vlmdistill.wrap(setup.student, plugin="kd", teacher=setup.teacher, alpha=0.5, temperature=2.0)
    for model in (plain, setup.student, setup.teacher):
        compile_layers(model, backend=args.compile_backend)

    def arm(model, params):
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def run(counter: SavedBytes | None = None):
            train_step(model, setup.batch, optimizer, device, args.autocast, counter)

        return Arm(run)

    return {"plain (compiled)": arm(plain, plain.parameters()),
            "kd (compiled)": arm(wrapped, setup.student.parameters())}


def run(args, device) -> dict:
    setup = build(args, device)
    steps = compiled_arms(setup, args, device) if args.compile else make_arms(setup, args, device)
    plain_name, kd_name = list(steps)
    saved = {}
    for name, arm in steps.items():
        counter = SavedBytes()
        Arm(lambda arm=arm, counter=counter: arm.run(counter), arm.enter, arm.exit)()  # also a warm-up
        saved[name] = counter.total

    def progress(rep, this):
        print(f"  repetition {rep}: " + ", ".join(f"{n} {w:.2f} s ({c:.2f} s CPU)" for n, (w, c) in this.items()),
              flush=True)

    timing = time_interleaved(steps, steps=args.steps, warmup=args.warmup, device=device, baseline=plain_name,
                              on_step=progress)
    result = {"setup": setup.describe, "timing": timing, "floor": step_floor(setup), "arms": [plain_name, kd_name],
              "saved_for_backward_bytes": saved, "extra_saved_bytes": saved[kd_name] - saved[plain_name],
              "teacher_weight_bytes": weight_bytes(setup.teacher)}
    if device.type == "cuda":
        result["cuda_step_peak_bytes"] = {name: cuda_step_peak(step) for name, step in steps.items()}
    return result


def memory_arm(args, arm: str) -> dict:
    device = torch.device("cpu")
    setup = build(args, device, with_teacher=arm != "plain")
    return measure_rss(make_arms(setup, args, device)[arm])


def report(r: dict, args) -> str:
    mb = 1 / 2 ** 20
    timing, fl = r["timing"], r["floor"]
    plain, kd = r["arms"]
    ratio = timing["ratio"][kd]
    amp = f", {args.autocast} autocast" if args.autocast else ""
    lines = [f"{r['setup']}; fp32 weights{amp}; {r['device']}; interleaved, {args.steps} repetitions after "
             f"{args.warmup} warm-up",
             f"median step: {plain} {timing['median_wall_s'][plain]:.3f} s, {kd} {timing['median_wall_s'][kd]:.3f} s",
             f"{kd} / {plain}: {ratio_text(ratio)} wall, {ratio_text(timing['ratio_cpu'][kd])} CPU time; floor from "
             f"the shapes 1 + {fl['teacher_forward_flops'] / 1e9:.1f} / {fl['student_training_flops'] / 1e9:.1f} "
             f"GFLOP = {fl['floor']:.3f}; measured / floor {ratio['median'] / fl['floor']:.3f} wall, "
             f"{timing['ratio_cpu'][kd]['median'] / fl['floor']:.3f} CPU time (target <= 1.05)",
             f"saved for backward: plain {r['saved_for_backward_bytes'][plain] * mb:.1f} MiB, kd "
             f"{r['saved_for_backward_bytes'][kd] * mb:.1f} MiB, extra {r['extra_saved_bytes'] * mb:.1f} MiB; "
             f"teacher weights {r['teacher_weight_bytes'] * mb:.1f} MiB"]
    if r.get("cuda_step_peak_bytes"):
        lines += cuda_peak_lines(r["cuda_step_peak_bytes"], r["teacher_weight_bytes"], r["teacher_weight_bytes"])
    if r.get("rss"):
        rss = r["rss"]
        extra = rss["kd"]["peak"] - rss["plain"]["peak"]
        lines.append(f"resident memory (one process per arm, peak during a step): plain {rss['plain']['peak'] * mb:.0f}"
                     f" MiB, kd {rss['kd']['peak'] * mb:.0f} MiB, extra {extra * mb:+.0f} MiB (target <= "
                     f"{1.05 * r['teacher_weight_bytes'] * mb:.0f} MiB)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="smolvlm-256m, smollm2-360m-vlm or tiny (default: Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="mixed precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="CPU: peak resident memory, one process per arm")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoder / encoder layers (student, its plain copy, teacher)")
    parser.add_argument("--compile-backend", default="inductor")
    add_out_argument(parser)
    parser.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_arm:
        print(json.dumps(memory_arm(args, args.memory_arm)))
        return 0
    device = torch.device(args.device)
    r = run(args, device)
    r["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cpu" and args.memory:
        child = [a for a in argv if a != "--memory"]
        r["rss"] = {arm: rss_in_subprocess(MODULE, child, arm) for arm in ("plain", "kd")}
    text = report(r, args)
    print(text)
    write_results(args.out, r, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
