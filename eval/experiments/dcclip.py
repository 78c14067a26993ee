"""Does DC-CLIP's two-stage distillation give a better small bilingual CLIP? (`vlmdistill demo dcclip`)

Real images (scikit-learn's 8x8 handwritten digits) get English and Chinese captions from several
templates each ("a photo of the digit seven." / "数字七的照片。"), written as webdataset shards. A
byte-level BPE tokenizer trained on those captions is shared by every model. A larger CLIP teacher
(transformers CLIPModel) is trained briefly with symmetric InfoNCE; then a ~10x smaller student is
trained with the same step budget (a) from scratch with InfoNCE, and (b) with DC-CLIP: stage 1
feature distillation from cached teacher features, stage 2 InfoNCE. Each model is exported as a
plain transformers folder and evaluated zero-shot on held-out digits by the ELEVATER harness with
English and with Chinese prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from typing import Any

import numpy as np
import torch

import vlmdistill
from vlmdistill.data.digits import (CAPTION_TEMPLATES_EN, CAPTION_TEMPLATES_ZH, DIGIT_NAMES_EN, DIGIT_NAMES_ZH,
                                    digit_caption, load_digits_images)

IMAGE_SIZE = 16          # digits are 8x8; every model sees them upscaled (bicubic) to 16x16
TEACHER = dict(hidden=96, layers=3, heads=4, patch=4, projection=64)    # 4x4 patch grid
STUDENT = dict(hidden=32, layers=2, heads=2, patch=8, projection=64)    # 2x2 patch grid, teacher's joint width
BATCH = 64
LR = 3e-3
TEACHER_STEPS = 700      # long enough for the teacher to beat a student trained from scratch
STUDENT_STEPS = 150      # a budget at which the student from scratch is not yet saturated


# ---------------------------------------------------------------------------- data

def _digit_pixels(images: torch.Tensor) -> list[np.ndarray]:
    return [(img[0].numpy() * 255).round().astype(np.uint8) for img in images]


def build_data(workdir: str, *, quick: bool) -> dict[str, Any]:
    """Training shards (one English and one Chinese caption per training image), the held-out
    evaluation set in the IRIS layout, and the shared tokenizer."""
    from vlmdistill.eval.elevater.dataset_writers import write_iris
    from vlmdistill.plugins.dcclip.data import ImageTextSample, write_image_text_shards
    from vlmdistill.plugins.dcclip.tokenizer import train_caption_tokenizer
    from PIL import Image

    train_x, train_y, test_x, test_y = load_digits_images(size=8, seed=0)
    if quick:
        train_x, train_y, test_x, test_y = train_x[:256], train_y[:256], test_x[:100], test_y[:100]
    rng = np.random.default_rng(0)
    samples = []
    for i, (pixels, label) in enumerate(zip(_digit_pixels(train_x), train_y.tolist())):
        for language in ("en", "zh"):
            template = int(rng.integers(4))
            samples.append(ImageTextSample(f"digit{i:05d}_{language}", np.repeat(pixels[:, :, None], 3, axis=2),
                                           digit_caption(label, language, template), language))
    order = rng.permutation(len(samples))
    samples = [samples[i] for i in order]
    shards = os.path.join(workdir, "train_shards")
    write_image_text_shards(samples, shards, samples_per_shard=800)
    eval_dir = os.path.join(workdir, "eval_digits")
    test_images = [Image.fromarray(p).convert("RGB") for p in _digit_pixels(test_x)]
    write_iris(eval_dir, test_images, [(int(y),) for y in test_y.tolist()], DIGIT_NAMES_EN)
    captions = [digit_caption(label, language, t) for label in range(10) for language in ("en", "zh")
                for t in range(4)]
    tokenizer = train_caption_tokenizer(captions, vocab_size=600, max_length=32)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    return {"shards": shards, "eval": eval_dir, "tokenizer": tokenizer, "num_train_images": len(train_y),
            "num_train_samples": len(samples), "num_test_images": len(test_y)}


def make_loader(shards: str, tokenizer, *, seed: int, shuffle: bool = True):
    from vlmdistill.plugins.dcclip.data import ClipImageTransform, ImageTextCollator, ImageTextShards

    dataset = ImageTextShards(shards, ClipImageTransform(IMAGE_SIZE), tokenizer, max_length=32,
                              shuffle_buffer=1000 if shuffle else 0, shardshuffle=4 if shuffle else False, seed=seed)
    collate = ImageTextCollator(tokenizer.pad_token_id)
    return dataset, collate


def batches(dataset, collate, batch_size: int = BATCH):
    """An endless stream of full batches; each pass over the shards is one epoch."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, drop_last=True,
                                             num_workers=0)
        yield from loader
        epoch += 1


def model_inputs(batch: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    names = ("pixel_values", "input_ids", "attention_mask", *keep)
    return {k: batch[k] for k in names if k in batch}


# ---------------------------------------------------------------------------- models & training

def make_clip(size: dict, vocab: int, seed: int):
    from vlmdistill.plugins.dcclip.testing import tiny_hf_clip

    return tiny_hf_clip(hidden=size["hidden"], layers=size["layers"], heads=size["heads"], patch=size["patch"],
                        image_size=IMAGE_SIZE, vocab=vocab, max_positions=32, projection=size["projection"],
                        seed=seed)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(wrapped, stream, steps: int, *, lr: float = LR, keep: tuple[str, ...] = (), label: str = "",
          snapshot: tuple[str, Any] | None = None) -> list[dict]:
    """A hand-written loop: AdamW, linear warm-up then cosine decay, `step_end()` after each step.
    `snapshot=(directory, tokenizer)` exports the student when the stage switches (for evaluation)."""
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    wrapped.train()
    history = []
    for step in range(steps):
        batch = next(stream)
        out = wrapped(**model_inputs(batch, keep))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        stage = int(wrapped.plugin.stage)  # the stage this step trained in (step_end may switch it)
        wrapped.step_end()
        if snapshot is not None and stage == 1 and int(wrapped.plugin.stage) == 2:
            export(wrapped.student, snapshot[1], snapshot[0])
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            terms = {k: round(float(v), 4) for k, v in out.loss_terms.items()}
            history.append({"step": step + 1, "stage": stage, "loss": round(float(out.loss.detach()), 4), **terms})
            print(f"  {label} step {step + 1}/{steps} stage {stage} loss {float(out.loss.detach()):.4f} {terms}",
                  flush=True)
    return history


def export(model, tokenizer, directory: str) -> str:
    """The student as an ordinary transformers folder (model + tokenizer), nothing of vlmdistill."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def zero_shot(model_dir: str, eval_dir: str) -> dict[str, float]:
    """Top-1 accuracy with English and with Chinese prompts, through the ELEVATER harness."""
    from vlmdistill.eval.elevater.adapters import load_model
    from vlmdistill.eval.elevater.readers import read_dataset
    from vlmdistill.eval.elevater.runner import evaluate_zero_shot
    from vlmdistill.eval.elevater.tasks import TaskSpec

    model = load_model(model_dir, kind="hf")
    data = read_dataset(eval_dir)
    out = {}
    for language, names, templates in (("en", DIGIT_NAMES_EN, CAPTION_TEMPLATES_EN),
                                       ("zh", DIGIT_NAMES_ZH, CAPTION_TEMPLATES_ZH)):
        spec = TaskSpec(name="digits", classnames=tuple(names), templates=tuple(templates), language=language)
        result = evaluate_zero_shot(model, spec, data, protocol="elevater", batch_size=256, progress=False)
        out[language] = float(result["metrics"]["acc1"])
    return out


# ---------------------------------------------------------------------------- the experiment

ARMS = (
    # (row name, dcclip config or None for plain InfoNCE from scratch)
    ("student, from scratch", None),
    ("student, DC-CLIP", {"image_weight": 1.0, "text_weight": 1.0}),
    ("student, DC-CLIP + embedding term", {"image_weight": 1.0, "text_weight": 1.0, "embedding_weight": 1.0}),
)


def run(output_dir: str, seeds: list[int], quick: bool = False, threads: int = 1) -> dict[str, Any]:
    # Tiny models are overhead-bound: one intra-op thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(threads)
    started = time.perf_counter()
    workdir = os.path.join(output_dir, "artifacts")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    teacher_steps, student_steps = (12, 12) if quick else (TEACHER_STEPS, STUDENT_STEPS)
    stage1_steps = student_steps // 2
    timings: dict[str, float] = {"eval": 0.0}

    t0 = time.perf_counter()
    data = build_data(workdir, quick=quick)
    tokenizer = data["tokenizer"]
    vocab = len(tokenizer)
    timings["data"] = time.perf_counter() - t0

    print(f"[dcclip demo] teacher: {teacher_steps} InfoNCE steps", flush=True)
    t0 = time.perf_counter()
    teacher = make_clip(TEACHER, vocab, seed=1000)
    dataset, collate = make_loader(data["shards"], tokenizer, seed=1000)
    wrapped = vlmdistill.wrap(teacher, plugin="dcclip", stage=2)  # stage 2 alone = plain CLIP training
    histories: dict[str, Any] = {"teacher": train(wrapped, batches(dataset, collate), teacher_steps, label="teacher")}
    teacher = vlmdistill.unwrap(wrapped).eval()
    teacher_dir = export(teacher, tokenizer, os.path.join(workdir, "teacher"))
    timings["teacher_train"] = time.perf_counter() - t0

    # Teacher features once, over the unshuffled training shards: stage 1 then runs no teacher forward.
    t0 = time.perf_counter()
    cache_dir = os.path.join(workdir, "teacher_cache")
    dataset, collate = make_loader(data["shards"], tokenizer, seed=0, shuffle=False)
    builder = vlmdistill.wrap(make_clip(STUDENT, vocab, seed=0), plugin="dcclip", teacher=teacher,
                              data_fingerprint=dataset.fingerprint(), teacher_tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate)
    builder.plugin.build_teacher_cache(loader, cache_dir, progress=False)
    vlmdistill.unwrap(builder)
    timings["teacher_cache"] = time.perf_counter() - t0

    def evaluate(directory: str) -> dict[str, float]:
        t = time.perf_counter()
        out = zero_shot(directory, data["eval"])
        timings["eval"] += time.perf_counter() - t
        return out

    rows = [{"model": "teacher", "seed": 1000, "params": parameter_count(teacher), "steps": teacher_steps,
             **evaluate(teacher_dir)}]
    for seed in seeds:
        for arm, (name, config) in enumerate(ARMS):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            dataset, collate = make_loader(data["shards"], tokenizer, seed=seed)
            student = make_clip(STUDENT, vocab, seed=seed)  # the same initial weights in every arm
            tag = f"arm{arm}_seed{seed}"
            if config is None:
                print(f"[dcclip demo] seed {seed}: {name}, {student_steps} InfoNCE steps", flush=True)
                wrapped = vlmdistill.wrap(student, plugin="dcclip", stage=2)
                snapshot = None
            else:
                print(f"[dcclip demo] seed {seed}: {name}, stage 1 for {stage1_steps} steps (cached teacher "
                      f"features), stage 2 for {student_steps - stage1_steps}", flush=True)
                wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=teacher, stage=1,
                                          switch_at_step=stage1_steps, teacher_cache=cache_dir,
                                          data_fingerprint=dataset.fingerprint(), student_tokenizer=tokenizer,
                                          teacher_tokenizer=tokenizer, **config)
                snapshot = os.path.join(workdir, f"{tag}_after_stage1")
            histories[f"{tag}"] = train(wrapped, batches(dataset, collate), student_steps,
                                        keep=("sample_key", "augmentation_seed"), label=name,
                                        snapshot=(snapshot, tokenizer) if snapshot else None)
            if config is not None:
                assert int(wrapped.plugin.switched_at_step) == stage1_steps
            directory = export(vlmdistill.unwrap(wrapped), tokenizer, os.path.join(workdir, tag))
            timings[tag] = time.perf_counter() - t0
            row = {"model": name, "seed": seed, "params": parameter_count(student), "steps": student_steps,
                   **evaluate(directory)}
            if snapshot:
                row["after_stage1"] = evaluate(snapshot)
            rows.append(row)

    results = {"experiment": "dcclip-digits", "quick": quick, "seeds": seeds, "rows": rows,
               "summary": _summarise(rows),
               "setup": {"image_size": IMAGE_SIZE, "teacher": TEACHER, "student": STUDENT, "batch": BATCH, "lr": LR,
                         "teacher_steps": teacher_steps, "student_steps": student_steps,
                         "stage1_steps": stage1_steps, "tokenizer_vocab": vocab, "arms": [a[0] for a in ARMS],
                         "arm_configs": [a[1] for a in ARMS],
                         "train_images": data["num_train_images"], "train_samples": data["num_train_samples"],
                         "test_images": data["num_test_images"], "torch_threads": torch.get_num_threads()},
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "wall_time_s": round(time.perf_counter() - started, 1), "histories": histories}
    return results


def _summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        entry = {"model": name, "params": group[0]["params"], "runs": len(group)}
        for language in ("en", "zh"):
            values = [r[language] for r in group]
            entry[f"{language}_mean"] = statistics.mean(values)
            entry[f"{language}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if "after_stage1" in group[0]:
                entry[f"{language}_after_stage1_mean"] = statistics.mean(r["after_stage1"][language] for r in group)
        out.append(entry)
    return out


def markdown(results: dict) -> str:
    lines = ["| model | params | runs (seeds) | zero-shot top-1, English prompts | zero-shot top-1, Chinese prompts "
             "| after stage 1 (en / zh) |", "|---|---:|---:|---:|---:|---:|"]
    for e in results["summary"]:
        stage1 = (f"{100 * e['en_after_stage1_mean']:.1f} / {100 * e['zh_after_stage1_mean']:.1f}"
                  if "en_after_stage1_mean" in e else "")
        lines.append(f"| {e['model']} | {e['params']:,} | {e['runs']} | {100 * e['en_mean']:.1f} ± "
                     f"{100 * e['en_std']:.1f} | {100 * e['zh_mean']:.1f} ± {100 * e['zh_std']:.1f} | {stage1} |")
    lines += ["", "Per seed (± above: standard deviation over seeds):", "", "| model | seed | English | Chinese |",
              "|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['seed']} | {100 * r['en']:.1f} | {100 * r['zh']:.1f} |")
    s = results["setup"]
    lines += ["", f"Teacher {s['teacher_steps']} steps; students {s['student_steps']} steps each (DC-CLIP: "
              f"{s['stage1_steps']} stage-1 + {s['student_steps'] - s['stage1_steps']} stage-2); batch {s['batch']}; "
              f"{s['train_images']} training images x 2 captions, {s['test_images']} held-out images; "
              f"wall time {results['wall_time_s']} s ({s['torch_threads']} torch threads)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo dcclip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo-dcclip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few steps on a subset: a smoke test, not a result")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results = run(args.output_dir, args.seeds, quick=args.quick, threads=args.threads)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, ensure_ascii=False)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("# DC-CLIP demo: zero-shot digits, English and Chinese prompts\n\n" + table)
    from .plots import plot_dcclip

    plot_dcclip(results, os.path.join(args.output_dir, "results.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
