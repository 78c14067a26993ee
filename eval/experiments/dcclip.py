"""Does DC-CLIP's two-stage distillation give a better small bilingual CLIP? (`vlmdistill demo dcclip`)

Real images (scikit-learn's 8x8 handwritten digits, upscaled to 16x16) with English and Chinese captions. A
larger CLIP teacher (transformers CLIPModel) is first trained on a broad caption set (six templates per
language: its "pretraining"); a ~9x smaller student then gets a narrow one (two of those templates) and the
same step budget in every arm: InfoNCE from scratch, a logit-distillation baseline in the style of CLIP-KD,
DC-CLIP (stage 1 feature distillation from cached teacher features, stage 2 InfoNCE, each stage with a fresh
optimizer and its own warm-up and cosine schedule), and DC-CLIP with the embedding-level term. Two more
settings follow the paper's claims: stage 2 on 10 % of the pairs ("less data"), and stage 2 on the English
pairs only, evaluated in Chinese.

Evaluation is true zero-shot: every model is exported as a plain transformers folder and evaluated by the
ELEVATER harness on held-out images with prompt templates that no model saw in training. Hyperparameters are
chosen on a validation split (held-out training images, and validation templates unseen in training and
different from the test templates) with seeds of their own; the test split is evaluated once per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import vlmdistill
from vlmdistill.data.digits import DIGIT_NAMES_EN, DIGIT_NAMES_ZH, load_digits_images

IMAGE_SIZE = 16          # digits are 8x8; every model sees them upscaled (bicubic) to 16x16
TEACHER = dict(hidden=96, layers=3, heads=4, patch=4, projection=64)    # 4x4 patch grid
STUDENT = dict(hidden=32, layers=2, heads=2, patch=8, projection=64)    # 2x2 patch grid, teacher's joint width
BATCH = 64
LR = 3e-3
TEACHER_STEPS = 700
STUDENT_STEPS = 150      # every student arm, whatever its stages
VALIDATION_IMAGES = 270  # held out of the training images, for model selection only
PAIR_FRACTION = 0.1      # "less data": stage 2 (and the matching scratch baseline) on 10 % of the pairs
TEST_SEEDS = (0, 1, 2, 3, 4)
VALIDATION_SEEDS = (100, 101)

# Caption templates. The teacher's six include the student's two; validation and test templates are seen by no
# model in training, and differ from each other (checked in `check_templates`).
TEMPLATES = {
    "teacher": {"en": ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand.",
                       "a low resolution image of a {}.", "a scan of a handwritten {}.",
                       "a blurry picture of the number {}."],
                "zh": ["数字{}的照片。", "手写的{}。", "一个手写的数字{}。", "低分辨率的数字{}图像。",
                       "手写{}的扫描件。", "数字{}的模糊图片。"]},
    "student": {"en": ["a photo of the digit {}.", "a handwritten {}."], "zh": ["数字{}的照片。", "手写的{}。"]},
    "validation": {"en": ["an image of the digit {}.", "a drawing of a {}."], "zh": ["数字{}的图像。", "一幅{}的画。"]},
    "test": {"en": ["a picture of a handwritten digit {}.", "the digit {}.", "a small image of the number {}."],
             "zh": ["手写数字{}的图片。", "数字{}。", "数字{}的小图像。"]},
}
CLASS_NAMES = {"en": DIGIT_NAMES_EN, "zh": DIGIT_NAMES_ZH}
LANGUAGES = ("en", "zh")


def check_templates() -> None:
    """Zero-shot means unseen prompts: no evaluation template is a training template, validation != test."""
    seen = {t for role in ("teacher", "student") for lang in LANGUAGES for t in TEMPLATES[role][lang]}
    for lang in LANGUAGES:
        if not set(TEMPLATES["student"][lang]) <= set(TEMPLATES["teacher"][lang]):
            raise AssertionError("the student's templates must be a subset of the teacher's")
        for role in ("validation", "test"):
            if set(TEMPLATES[role][lang]) & seen:
                raise AssertionError(f"{role} templates overlap the training templates ({lang})")
        if set(TEMPLATES["validation"][lang]) & set(TEMPLATES["test"][lang]):
            raise AssertionError(f"validation and test templates overlap ({lang})")


def caption(label: int, language: str, template: str) -> str:
    return template.format(CLASS_NAMES[language][label])


# ---------------------------------------------------------------------------- data

def _digit_pixels(images: torch.Tensor) -> list[np.ndarray]:
    return [(img[0].numpy() * 255).round().astype(np.uint8) for img in images]


def _samples(pixels: list[np.ndarray], labels: list[int], templates: dict[str, list[str]], per_language: int,
             rng: np.random.Generator):
    from vlmdistill.plugins.dcclip.data import ImageTextSample

    out = []
    for i, (image, label) in enumerate(zip(pixels, labels)):
        rgb = np.repeat(image[:, :, None], 3, axis=2)
        for language in LANGUAGES:
            chosen = rng.choice(len(templates[language]), size=per_language, replace=False)
            for k, t in enumerate(chosen):
                key = f"digit{i:05d}_{language}" + (f"_{k}" if per_language > 1 else "")
                out.append(ImageTextSample(key, rgb, caption(label, language, templates[language][int(t)]),
                                           language))
    return out


def build_data(workdir: str, *, quick: bool) -> dict[str, Any]:
    """Teacher and student training shards, validation and test sets in the IRIS layout, and one tokenizer
    (trained on the teacher's captions, which include the student's) shared by every model."""
    from PIL import Image

    from vlmdistill.eval.elevater.dataset_writers import write_iris
    from vlmdistill.plugins.dcclip.data import write_image_text_shards
    from vlmdistill.data.text import train_caption_tokenizer

    check_templates()
    train_x, train_y, test_x, test_y = load_digits_images(size=8, seed=0)
    n_val = VALIDATION_IMAGES
    val_x, val_y, train_x, train_y = train_x[-n_val:], train_y[-n_val:], train_x[:-n_val], train_y[:-n_val]
    if quick:
        train_x, train_y, val_x, val_y, test_x, test_y = (train_x[:192], train_y[:192], val_x[:60], val_y[:60],
                                                          test_x[:60], test_y[:60])
    pixels, labels = _digit_pixels(train_x), train_y.tolist()
    rng = np.random.default_rng(0)
    teacher_samples = _samples(pixels, labels, TEMPLATES["teacher"], 3, rng)
    student_samples = _samples(pixels, labels, TEMPLATES["student"], 1, rng)
    few = sorted(rng.choice(len(student_samples), size=max(BATCH, round(PAIR_FRACTION * len(student_samples))),
                            replace=False).tolist())
    paths = {}
    for name, folder, samples in (("teacher", "teacher_shards", teacher_samples),
                                  ("student", "train_shards", student_samples),
                                  ("student_few", "train_shards_10pct", [student_samples[i] for i in few])):
        order = rng.permutation(len(samples))
        paths[name] = os.path.join(workdir, folder)
        write_image_text_shards([samples[i] for i in order], paths[name], samples_per_shard=800)
    for split, x, y in (("validation", val_x, val_y), ("test", test_x, test_y)):
        images = [Image.fromarray(p).convert("RGB") for p in _digit_pixels(x)]
        paths[split] = os.path.join(workdir, f"eval_{split}")
        write_iris(paths[split], images, [(int(v),) for v in y.tolist()], DIGIT_NAMES_EN)
    captions = [s.caption for s in teacher_samples]
    tokenizer = train_caption_tokenizer(sorted(set(captions)), vocab_size=600, max_length=32)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    return {"paths": paths, "tokenizer": tokenizer, "train_images": len(labels), "validation_images": len(val_y),
            "test_images": len(test_y), "teacher_pairs": len(teacher_samples), "student_pairs": len(student_samples),
            "few_pairs": len(few)}


def shard_reader(shards: str, tokenizer, languages: tuple[str, ...] | None = None):
    from vlmdistill.plugins.dcclip.data import ClipImageTransform, ImageTextCollator, ImageTextShards

    dataset = ImageTextShards(shards, ClipImageTransform(IMAGE_SIZE), tokenizer, max_length=32, languages=languages)
    return dataset, ImageTextCollator(tokenizer.pad_token_id, pad_to=32)


class Pairs:
    """The samples of a shard set, read once through the webdataset reader and held as tensors, so that every
    arm of a seed draws the same batches in the same order at no loading cost."""

    def __init__(self, shards: str, tokenizer, languages: tuple[str, ...] | None = None):
        dataset, collate = shard_reader(shards, tokenizer, languages)
        self.fingerprint = dataset.fingerprint()
        loader = torch.utils.data.DataLoader(dataset, batch_size=512, collate_fn=collate)
        parts = list(loader)
        self.columns = {k: torch.cat([p[k] for p in parts]) for k in ("pixel_values", "input_ids", "attention_mask",
                                                                       "sample_key", "augmentation_seed")}
        self.size = len(self.columns["input_ids"])

    def stream(self, seed: int, batch_size: int = BATCH) -> Iterator[dict[str, torch.Tensor]]:
        """Endless full batches; a new permutation (seeded) each epoch."""
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(self.size, generator=g)
            for start in range(0, self.size - batch_size + 1, batch_size):
                rows = order[start:start + batch_size]
                yield {k: v[rows] for k, v in self.columns.items()}


# ---------------------------------------------------------------------------- models & training

def make_clip(size: dict, vocab: int, seed: int):
    from vlmdistill.eval.tiny_models import tiny_hf_clip

    return tiny_hf_clip(hidden=size["hidden"], layers=size["layers"], heads=size["heads"], patch=size["patch"],
                        image_size=IMAGE_SIZE, vocab=vocab, max_positions=32, projection=size["projection"],
                        seed=seed)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup_cosine(length: int) -> Callable[[int], float]:
    """Linear warm-up over 5 % of `length` steps, then cosine decay to 0 at `length`."""
    warmup = max(1, length // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, length) / length))


def logit_distillation(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: list[str], cache,
                       teacher_scale: float) -> torch.Tensor:
    """CLIP-KD's relation (logit) distillation: KL from the teacher's image-to-text and text-to-image
    distributions over the batch to the student's, each at its own model's logit scale."""
    s_logits = image @ text.t() * scale
    t = cache.lookup(keys, [0] * len(keys), None, check_inputs=False)
    t_logits = (t.image_embeds @ t.text_embeds.t()).to(s_logits) * teacher_scale

    def kl(student, teacher):
        return F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                        reduction="batchmean")

    return 0.5 * (kl(s_logits, t_logits) + kl(s_logits.t(), t_logits.t()))


def train(wrapped, streams: dict[int, Iterator], steps: int, *, lr: float = LR, kd: dict | None = None,
          snapshot: Callable[[], None] | None = None) -> dict[str, Any]:
    """A hand-written loop: AdamW, warm-up + cosine, `step_end()` after each step. When the plugin declares
    stages (dcclip's `restart_optimizer_at_switch`), each stage has its own schedule and starts from a fresh
    optimizer state (the `vlmdistill.stages` helpers); otherwise one schedule runs over all steps. `streams[stage]`
    gives the batches of each stage. `kd={'weight', 'cache', 'teacher_scale'}` adds the logit-distillation term.
    `snapshot` is called when stage 1 ends (to evaluate the student then)."""
    from vlmdistill.data.image_text import decode_keys
    from vlmdistill.stages import reset_optimizer_state, staged_scheduler

    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = staged_scheduler(optimizer, wrapped.plugin.stage_boundaries(), steps, warmup_cosine)
    wrapped.train()
    history = []
    for step in range(steps):
        stage = int(wrapped.plugin.stage)
        batch = next(streams[stage])
        keep = ("sample_key", "augmentation_seed") if stage == 1 else ()
        out = wrapped(**{k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask", *keep)})
        loss, terms = out.loss, {k: float(v) for k, v in out.loss_terms.items()}
        if kd is not None:
            term = logit_distillation(out.image_embeds, out.text_embeds, wrapped.student.logit_scale.exp(),
                                      decode_keys(batch["sample_key"]), kd["cache"], kd["teacher_scale"])
            loss = loss + kd["weight"] * term
            terms["logit_kd"] = float(term.detach())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if wrapped.step_end():  # True after the last step of a stage
            reset_optimizer_state(optimizer)
        if snapshot is not None and stage == 1 and int(wrapped.plugin.stage) == 2:
            snapshot()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            history.append({"step": step + 1, "stage": stage, "lr": schedule.get_last_lr()[0],
                            "loss": round(float(loss.detach()), 4), **{k: round(v, 4) for k, v in terms.items()}})
    return {"history": history}


def export(model, tokenizer, directory: str) -> str:
    """The student as an ordinary transformers folder (model + tokenizer), nothing of vlmdistill."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def zero_shot(model_dir: str, eval_dir: str, split: str) -> dict[str, float]:
    """Top-1 accuracy with the `split` prompt templates, in English and in Chinese, through the ELEVATER harness."""
    from vlmdistill.eval.elevater.adapters import load_model
    from vlmdistill.eval.elevater.readers import read_dataset
    from vlmdistill.eval.elevater.runner import evaluate_zero_shot
    from vlmdistill.eval.elevater.tasks import TaskSpec

    model = load_model(model_dir, kind="hf")
    data = read_dataset(eval_dir)
    out = {}
    for language in LANGUAGES:
        spec = TaskSpec(name="digits", classnames=tuple(CLASS_NAMES[language]),
                        templates=tuple(TEMPLATES[split][language]), language=language)
        result = evaluate_zero_shot(model, spec, data, protocol="elevater", batch_size=512, progress=False)
        out[language] = float(result["metrics"]["acc1"])
    return out


# ---------------------------------------------------------------------------- arms

DCCLIP_SPEC = {"image_weight": 1.0, "text_weight": 1.0}
DCCLIP_EMB = {"image_weight": 1.0, "text_weight": 1.0, "embedding_weight": 1.0}

#: hyperparameter grid per method, each point trained on the validation seeds and scored on the validation split
GRID = {
    "scratch": [{"lr": 3e-3}, {"lr": 6e-3}],
    "logit_kd": [{"kd_weight": 1.0}, {"kd_weight": 4.0}],
    "dcclip": [{"stage1_fraction": 1 / 3, **DCCLIP_SPEC}, {"stage1_fraction": 1 / 2, **DCCLIP_SPEC}],
    "dcclip_emb": [{"stage1_fraction": 1 / 3, **DCCLIP_EMB}, {"stage1_fraction": 1 / 2, **DCCLIP_EMB}],
}

#: (row name, method, stage-2 / training pairs, extra settings); pairs: 'all', 'few' (10 %), 'en' (English only).
#: 'dcclip_best' is whichever DC-CLIP variant scored higher on validation.
ARMS = (
    ("from scratch", "scratch", "all", {}),
    ("logit distillation (CLIP-KD style)", "logit_kd", "all", {}),
    ("DC-CLIP", "dcclip", "all", {}),
    ("DC-CLIP + embedding term", "dcclip_emb", "all", {}),
    ("DC-CLIP + embedding term, one schedule across the stages", "dcclip_emb", "all",
     {"restart_optimizer_at_switch": False}),
    ("from scratch, 10% of the pairs", "scratch", "few", {}),
    ("DC-CLIP, stage 2 on 10% of the pairs", "dcclip_best", "few", {}),
    ("from scratch, English pairs only", "scratch", "en", {}),
    ("DC-CLIP, stage 2 on English pairs only", "dcclip_best", "en", {}),
)

#: paired comparisons reported with their significance: (arm, baseline, language or None for both);
#: BEST_ALL_PAIRS stands for the all-pairs row of the DC-CLIP variant chosen on validation
BEST_ALL_PAIRS = "@dcclip_best"
COMPARISONS = (
    ("DC-CLIP", "from scratch", None),
    ("DC-CLIP + embedding term", "from scratch", None),
    ("logit distillation (CLIP-KD style)", "from scratch", None),
    ("DC-CLIP + embedding term", "logit distillation (CLIP-KD style)", None),
    ("DC-CLIP + embedding term", "DC-CLIP + embedding term, one schedule across the stages", None),
    ("DC-CLIP, stage 2 on 10% of the pairs", "from scratch, 10% of the pairs", None),
    ("DC-CLIP, stage 2 on 10% of the pairs", "from scratch", None),
    ("DC-CLIP, stage 2 on English pairs only", "from scratch, English pairs only", "zh"),
    ("DC-CLIP, stage 2 on 10% of the pairs", BEST_ALL_PAIRS, None),
    ("DC-CLIP, stage 2 on English pairs only", BEST_ALL_PAIRS, "zh"),
)


class Experiment:
    def __init__(self, workdir: str, data: dict, teacher, steps: int):
        self.workdir, self.data, self.teacher, self.steps = workdir, data, teacher, steps
        self.tokenizer = data["tokenizer"]
        tok = self.tokenizer
        paths = data["paths"]
        self.pairs = {"all": Pairs(paths["student"], tok), "few": Pairs(paths["student_few"], tok),
                      "en": Pairs(paths["student"], tok, languages=("en",))}
        self.cache_dir = os.path.join(workdir, "teacher_cache")
        self._build_cache()
        from vlmdistill.plugins.dcclip.cache import TeacherFeatureCache

        self.cache = TeacherFeatureCache(self.cache_dir)
        self.teacher_scale = float(teacher.logit_scale.detach().exp())
        self.eval_seconds = 0.0

    def _build_cache(self) -> None:
        """Teacher features of every student sample, once: stage 1 then runs no teacher forward."""
        dataset, collate = shard_reader(self.data["paths"]["student"], self.tokenizer)
        builder = vlmdistill.wrap(make_clip(STUDENT, len(self.tokenizer), seed=0), plugin="dcclip",
                                  teacher=self.teacher, data_fingerprint=dataset.fingerprint(),
                                  student_tokenizer=self.tokenizer, teacher_tokenizer=self.tokenizer)
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate)
        builder.plugin.build_teacher_cache(loader, self.cache_dir, progress=False)
        vlmdistill.unwrap(builder)

    def evaluate(self, directory: str, split: str) -> dict[str, float]:
        t = time.perf_counter()
        out = zero_shot(directory, self.data["paths"][split], split)
        self.eval_seconds += time.perf_counter() - t
        return out

    def run_arm(self, method: str, settings: dict, pairs: str, seed: int, split: str, tag: str) -> dict[str, Any]:
        """One student: `method` with `settings`, trained on `pairs` (stage 1 of DC-CLIP always reads every
        student sample; its loss never uses the pairing), scored on `split` ('validation' or 'test')."""
        started, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        student = make_clip(STUDENT, len(self.tokenizer), seed=seed)  # the same initial weights in every arm
        stage2_stream = self.pairs[pairs].stream(seed)
        after_stage1 = None
        kd = None
        if method in ("scratch", "logit_kd"):
            wrapped = vlmdistill.wrap(student, plugin="dcclip", stage=2)  # stage 2 alone: plain CLIP training
            streams = {2: stage2_stream}
            if method == "logit_kd":
                kd = {"weight": settings["kd_weight"], "cache": self.cache, "teacher_scale": self.teacher_scale}
            snapshot = None
        else:
            stage1 = max(1, round(settings["stage1_fraction"] * self.steps))
            config = {k: v for k, v in settings.items() if k not in ("stage1_fraction", "lr")}
            wrapped = vlmdistill.wrap(student, plugin="dcclip", teacher=self.teacher, stage=1, switch_at_step=stage1,
                                      teacher_cache=self.cache_dir, data_fingerprint=self.pairs["all"].fingerprint,
                                      student_tokenizer=self.tokenizer, teacher_tokenizer=self.tokenizer, **config)
            streams = {1: self.pairs["all"].stream(seed + 7919), 2: stage2_stream}
            snapshot_dir = os.path.join(self.workdir, f"{tag}_after_stage1")

            def snapshot():
                nonlocal after_stage1
                if split == "test":
                    export(wrapped.student, self.tokenizer, snapshot_dir)
                    after_stage1 = self.evaluate(snapshot_dir, split)

        record = train(wrapped, streams, self.steps, lr=settings.get("lr", LR), kd=kd, snapshot=snapshot)
        if method not in ("scratch", "logit_kd"):
            assert int(wrapped.plugin.switched_at_step) == stage1
        directory = export(vlmdistill.unwrap(wrapped), self.tokenizer, os.path.join(self.workdir, tag))
        train_wall, train_cpu = time.perf_counter() - started, time.process_time() - cpu
        row = {"seed": seed, "params": parameter_count(student), "steps": self.steps, **self.evaluate(directory, split),
               "train_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1), "history": record["history"]}
        if after_stage1 is not None:
            row["after_stage1"] = after_stage1
        shutil.rmtree(directory, ignore_errors=True)
        return row


def select(experiment: Experiment, seeds: tuple[int, ...], log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """Each method's grid point with the best mean validation accuracy (English and Chinese averaged)."""
    chosen, table = {}, []
    for method, grid in GRID.items():
        best = None
        for point in grid:
            scores = []
            for seed in seeds:
                row = experiment.run_arm(method, point, "all", seed, "validation", f"val_{method}_{seed}")
                scores.append((row["en"] + row["zh"]) / 2)
            score = statistics.mean(scores)
            table.append({"method": method, "settings": point, "validation_accuracy": score, "per_seed": scores})
            log(f"  validation {method} {point}: {100 * score:.1f}")
            if best is None or score > best[0]:
                best = (score, point)
        chosen[method] = best[1]
    scores = {m: max(r["validation_accuracy"] for r in table if r["method"] == m) for m in ("dcclip", "dcclip_emb")}
    chosen["dcclip_best"] = chosen[max(scores, key=scores.get)]
    return chosen, table


def run(output_dir: str, seeds: list[int], quick: bool = False, threads: int = 1,
        validation_seeds: list[int] | None = None) -> dict[str, Any]:
    # Tiny models are overhead-bound: one intra-op thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    log = lambda message: print(f"[dcclip demo] {message}", flush=True)  # noqa: E731
    workdir = os.path.join(output_dir, "artifacts")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    teacher_steps, student_steps = (12, 12) if quick else (TEACHER_STEPS, STUDENT_STEPS)
    validation_seeds = list(validation_seeds or VALIDATION_SEEDS[:1 if quick else None])
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = build_data(workdir, quick=quick)
    tokenizer = data["tokenizer"]
    timings["data"] = time.perf_counter() - t0

    log(f"teacher: {teacher_steps} InfoNCE steps on {data['teacher_pairs']} pairs (six templates per language)")
    t0 = time.perf_counter()
    teacher = make_clip(TEACHER, len(tokenizer), seed=1000)
    wrapped = vlmdistill.wrap(teacher, plugin="dcclip", stage=2)
    teacher_record = train(wrapped, {2: Pairs(data["paths"]["teacher"], tokenizer).stream(1000)}, teacher_steps)
    teacher = vlmdistill.unwrap(wrapped).eval()
    teacher_dir = export(teacher, tokenizer, os.path.join(workdir, "teacher"))
    timings["teacher_train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    experiment = Experiment(workdir, data, teacher, student_steps)
    timings["reading_and_teacher_cache"] = time.perf_counter() - t0
    teacher_row = {"model": "teacher", "seed": 1000, "params": parameter_count(teacher), "steps": teacher_steps,
                   **experiment.evaluate(teacher_dir, "test"), "validation": experiment.evaluate(teacher_dir,
                                                                                                "validation")}

    log(f"model selection on the validation split, seeds {validation_seeds}")
    t0 = time.perf_counter()
    chosen, selection = select(experiment, tuple(validation_seeds), log)
    timings["model_selection"] = time.perf_counter() - t0
    log(f"chosen: {chosen}")

    rows = [teacher_row]
    t0 = time.perf_counter()
    for seed in seeds:
        for arm, (name, method, pairs, extra) in enumerate(ARMS):
            settings = {**chosen[method], **extra}
            row = experiment.run_arm(method.replace("_best", "") if method == "dcclip_best" else method,
                                     settings, pairs, seed, "test", f"arm{arm}_seed{seed}")
            rows.append({"model": name, "method": method, "pairs": pairs, "settings": settings, **row})
            stage1 = row.get("after_stage1")
            log(f"seed {seed}: {name}: en {100 * row['en']:.1f} zh {100 * row['zh']:.1f}"
                + (f" (after stage 1: {100 * stage1['en']:.1f} / {100 * stage1['zh']:.1f})" if stage1 else ""))
    timings["test_runs"] = time.perf_counter() - t0
    timings["eval"] = experiment.eval_seconds

    histories = {"teacher": teacher_record["history"]}
    for r in rows[1:]:
        histories[f"{r['model']} / seed {r['seed']}"] = r.pop("history")
    return {"experiment": "dcclip-digits-zero-shot", "quick": quick, "seeds": seeds,
            "validation_seeds": validation_seeds, "rows": rows, "summary": _summarise(rows),
            "comparisons": compare(rows, chosen), "model_selection": selection, "chosen": chosen,
            "setup": {"image_size": IMAGE_SIZE, "teacher": TEACHER, "student": STUDENT, "batch": BATCH,
                      "teacher_steps": teacher_steps, "student_steps": student_steps, "templates": TEMPLATES,
                      "tokenizer_vocab": len(tokenizer), "arms": [list(a[:3]) for a in ARMS],
                      **{k: v for k, v in data.items() if k not in ("paths", "tokenizer")},
                      "torch_threads": torch.get_num_threads()},
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "wall_time_s": round(time.perf_counter() - started, 1),
            "cpu_time_s": round(time.process_time() - cpu_started, 1), "histories": histories}


def _summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        entry = {"model": name, "params": group[0]["params"], "runs": len(group)}
        for language in LANGUAGES:
            values = [r[language] for r in group]
            entry[f"{language}_mean"] = statistics.mean(values)
            entry[f"{language}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if "after_stage1" in group[0]:
                entry[f"{language}_after_stage1_mean"] = statistics.mean(r["after_stage1"][language] for r in group)
        out.append(entry)
    return out


def paired(differences: list[float]) -> dict[str, float]:
    """Mean and standard deviation of paired differences, the paired t statistic and its two-sided p-value."""
    from scipy import stats

    n = len(differences)
    mean = statistics.mean(differences)
    std = statistics.stdev(differences) if n > 1 else 0.0
    if n < 2 or std == 0.0:
        return {"n": n, "mean": mean, "std": std, "t": float("nan"), "p": float("nan")}
    t = mean / (std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "t": t, "p": float(2 * stats.t.sf(abs(t), n - 1))}


def compare(rows: list[dict], chosen: dict) -> list[dict]:
    by = {(r["model"], r["seed"]): r for r in rows}
    best = "DC-CLIP + embedding term" if chosen["dcclip_best"] == chosen["dcclip_emb"] else "DC-CLIP"
    out = []
    for arm, baseline, language in COMPARISONS:
        baseline = best if baseline == BEST_ALL_PAIRS else baseline
        seeds = [s for (m, s) in by if m == arm and (baseline, s) in by]
        for lang in ([language] if language else LANGUAGES):
            diffs = [by[(arm, s)][lang] - by[(baseline, s)][lang] for s in seeds]
            if diffs:
                out.append({"arm": arm, "baseline": baseline, "language": lang, **paired(diffs)})
    return out


def markdown(results: dict) -> str:
    lines = ["| model | params | seeds | zero-shot top-1, English prompts | zero-shot top-1, Chinese prompts "
             "| after stage 1 (en / zh) |", "|---|---:|---:|---:|---:|---:|"]
    for e in results["summary"]:
        stage1 = (f"{100 * e['en_after_stage1_mean']:.1f} / {100 * e['zh_after_stage1_mean']:.1f}"
                  if "en_after_stage1_mean" in e else "")
        lines.append(f"| {e['model']} | {e['params']:,} | {e['runs']} | {100 * e['en_mean']:.1f} ± "
                     f"{100 * e['en_std']:.1f} | {100 * e['zh_mean']:.1f} ± {100 * e['zh_std']:.1f} | {stage1} |")
    lines += ["", "Paired differences over seeds (same initial weights and batches), points of accuracy; t: paired "
              "t statistic, p: two-sided:", "", "| arm | baseline | prompts | difference | t | p |",
              "|---|---|---|---:|---:|---:|"]
    for c in results["comparisons"]:
        lines.append(f"| {c['arm']} | {c['baseline']} | {c['language']} | {100 * c['mean']:+.1f} ± "
                     f"{100 * c['std']:.1f} | {c['t']:.2f} | {c['p']:.3f} |")
    lines += ["", "Model selection (validation split, validation templates, seeds "
              f"{results['validation_seeds']}; mean of English and Chinese):", "",
              "| method | settings | validation top-1 |", "|---|---|---:|"]
    for s in results["model_selection"]:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["settings"].items())
        lines.append(f"| {s['method']} | {settings} | {100 * s['validation_accuracy']:.1f} |")
    lines += ["", "Per seed:", "", "| model | seed | English | Chinese |", "|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['seed']} | {100 * r['en']:.1f} | {100 * r['zh']:.1f} |")
    s = results["setup"]
    lines += ["", f"Teacher {s['teacher_steps']} steps on {s['teacher_pairs']} pairs; students {s['student_steps']} "
              f"steps each, batch {s['batch']}, {s['student_pairs']} pairs ({s['few_pairs']} in the 10% set); "
              f"{s['train_images']} training, {s['validation_images']} validation, {s['test_images']} test images; "
              f"wall time {results['wall_time_s']} s, CPU time {results['cpu_time_s']} s "
              f"({s['torch_threads']} torch thread(s))."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo dcclip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo-dcclip")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    parser.add_argument("--validation-seeds", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="a few steps on a subset: a smoke test, not a result")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results = run(args.output_dir, args.seeds, quick=args.quick, threads=args.threads,
                  validation_seeds=args.validation_seeds)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, ensure_ascii=False)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("# DC-CLIP demo: true zero-shot digits, English and Chinese prompts\n\n" + table)
    from .plots import plot_dcclip

    plot_dcclip(results, os.path.join(args.output_dir, "results.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
