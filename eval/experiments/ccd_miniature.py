"""CCD miniature: character-level vs sequence-level self-distillation on rendered letter strings with ground truth.

Random lower-case strings (3–6 letters, four DejaVu fonts, random colours; `ccd_glyphs.py`) are rendered glyph by
glyph, so every image has its exact text mask and character boxes. Per seed, a small CCD ViT is pretrained without
labels twice, with the same settings and steps: CCD (`instances="characters"`) and the sequence-level baseline
(`instances="slices"`: vertical strips paired by position, whatever the warp). Measured on held-out images:

* segmentation IoU of each run's segmentation head against the ground-truth text masks (the k-means pseudo masks
  the head learns from are shown as a reference);
* a character probe: a linear classifier on the frozen encoder's features pooled in each ground-truth character
  box (weight decay chosen on the validation split);
* with `--finetune`, a CTC recogniser fine-tuned on 10% of the labels from random initialisation, from CCD and
  from the slice baseline (the step is chosen on the validation split), and from scratch on all labels;
* the collapse monitor: the teacher's entropy during pretraining and the entropy of its mean output on validation
  characters (uniform outputs: ln(out_dim); one prototype for all: 0).

Differences across seeds are tested with a paired t-test.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import time

import numpy as np
import torch

from .ccd import tiny_encoder

SETTINGS = {
    "full": dict(embed_dim=32, depth=3, heads=2, seg_blocks=[1, 2, 3], seg_hidden=16, seg_map=8, out_dim=512,
                 head_hidden=256, bottleneck=64, slices=4, teacher_momentum=0.99, teacher_temperature=0.04,
                 pretrain_images=1000, pretrain_steps=60, pretrain_batch=16, pretrain_lr=5e-4,
                 labelled=150, finetune_steps=300, finetune_batch=32, finetune_lr=1e-3, check_every=50,
                 validation=150, test=300),
    "quick": dict(embed_dim=32, depth=3, heads=2, seg_blocks=[1, 2, 3], seg_hidden=16, seg_map=8, out_dim=64,
                  head_hidden=32, bottleneck=16, slices=4, teacher_momentum=0.99, teacher_temperature=0.04,
                  pretrain_images=48, pretrain_steps=3, pretrain_batch=16, pretrain_lr=5e-4,
                  labelled=16, finetune_steps=4, finetune_batch=8, finetune_lr=1e-3, check_every=2,
                  validation=16, test=16),
}
PROBE_WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1)
ARMS = ("scratch", "slices", "ccd")


def _data(s: dict) -> dict:
    from .ccd_glyphs import glyph_strings

    return {"pretrain": glyph_strings(s["pretrain_images"], 101), "validation": glyph_strings(s["validation"], 202),
            "test": glyph_strings(s["test"], 303)}


def _pretrain(images: np.ndarray, s: dict, instances: str, seed: int, output_dir: str):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    import vlmdistill
    from vlmdistill.plugins.ccd import teacher_encoder
    from vlmdistill.data.rendered_words import WordImages, collate_unlabeled

    steps = s["pretrain_steps"]
    wrapped = vlmdistill.wrap(
        tiny_encoder(s, seed), plugin="ccd", instances=instances, slices=s["slices"], seg_blocks=s["seg_blocks"],
        out_dim=s["out_dim"], head_hidden_dim=s["head_hidden"], bottleneck_dim=s["bottleneck"],
        seg_hidden_channels=s["seg_hidden"], seg_map_channels=s["seg_map"], seed=seed,
        # a short run: a faster EMA than the paper's 0.9995, prototypes frozen for the first 10%, pseudo masks
        teacher_momentum=s["teacher_momentum"], teacher_temperature=s["teacher_temperature"],
        freeze_last_layer_fraction=0.1, pseudo_mask_fraction=1.0)
    args = TrainingArguments(output_dir=os.path.join(output_dir, f"pretrain-{instances}-{seed}"), max_steps=steps,
                             per_device_train_batch_size=s["pretrain_batch"], learning_rate=s["pretrain_lr"],
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.04,
                             max_grad_norm=3.0, logging_steps=max(1, steps // 10), save_strategy="no", report_to=[],
                             use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=wrapped, args=args, train_dataset=WordImages(images), data_collator=collate_unlabeled,
                      callbacks=[vlmdistill.DistillationCallback()])
    trainer.remove_callback(PrinterCallback)   # the teacher entropy is printed per run instead
    trainer.train()
    logs = [{k: v for k, v in h.items() if k in ("step", "loss") or k.startswith("distill/")}
            for h in trainer.state.log_history if "loss" in h]
    return wrapped, teacher_encoder(wrapped).eval(), logs


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    from vlmdistill.data.image_stats import IMAGENET_MEAN, IMAGENET_STD, unnormalise

    return unnormalise(pixels, IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def segmentation_iou(wrapped, images: np.ndarray, masks: np.ndarray, batch: int = 100) -> float:
    """Dataset IoU of the text class: the student's segmentation head (argmax) against the true masks."""
    from vlmdistill.plugins.ccd.backbones import patch_tokens
    from vlmdistill.data.rendered_words import to_pixel_values

    plugin, student = wrapped.plugin, wrapped.student
    spec, blocks = plugin.spec, plugin.config.seg_blocks
    captured = {}
    handles = [student.get_submodule(spec.block_path(b)).register_forward_hook(
        lambda m, i, o, b=b: captured.__setitem__(b, o)) for b in blocks]
    student.eval()
    plugin.seg_head.eval()
    predicted = []
    try:
        for start in range(0, len(images), batch):
            pixels = to_pixel_values(images[start:start + batch])
            grid = spec.grid(pixels.shape[-2:])
            student(pixel_values=pixels)
            logits = plugin.seg_head([patch_tokens(captured[b], grid).float() for b in blocks], grid,
                                     tuple(pixels.shape[-2:]))
            predicted.append(logits.argmax(1).bool())
    finally:
        for handle in handles:
            handle.remove()
    return iou(torch.cat(predicted), torch.from_numpy(masks))


def iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return ((predicted & truth).sum() / (predicted | truth).sum().clamp_min(1)).item()


@torch.no_grad()
def box_features(encoder, split: dict, max_characters: int = 6, batch: int = 100):
    """(features `[C, E]`, letters `[C]`): final tokens pooled in each ground-truth character box."""
    from vlmdistill.plugins.ccd.masks import pool_characters, slot_token_weights
    from vlmdistill.data.rendered_words import to_pixel_values

    from .ccd_glyphs import LETTERS, box_masks

    weights, present = slot_token_weights(torch.from_numpy(box_masks(split["boxes"], max_characters)), (8, 32))
    encoder.eval()
    feats = []
    for start in range(0, len(split["words"]), batch):
        tokens = encoder(pixel_values=to_pixel_values(split["images"][start:start + batch])).last_hidden_state
        feats.append(pool_characters(tokens, weights[start:start + batch]))
    feats = torch.cat(feats)[present]
    letters = torch.tensor([LETTERS.index(c) for w in split["words"] for c in w[:max_characters]])
    return feats, letters


def _fit_probe(x, y, x_eval, y_eval, weight_decay: float, seed: int, steps: int = 300) -> float:
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], 26)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (linear((x_eval - mean) / std).argmax(-1) == y_eval).float().mean().item()


def character_probe(encoder, labelled: dict, validation: dict, test: dict, seed: int) -> dict:
    """Linear probe on box-pooled features; weight decay chosen on the validation split, accuracy on test."""
    x, y = box_features(encoder, labelled)
    xv, yv = box_features(encoder, validation)
    xt, yt = box_features(encoder, test)
    on_validation = {wd: _fit_probe(x, y, xv, yv, wd, seed) for wd in PROBE_WEIGHT_DECAYS}
    best = max(on_validation, key=on_validation.get)
    return {"weight_decay": best, "validation": on_validation[best], "test": _fit_probe(x, y, xt, yt, best, seed)}


@torch.no_grad()
def teacher_mean_entropy(wrapped, validation: dict) -> float:
    """Entropy (nats) of the teacher's mean output distribution over the validation characters (its centred,
    sharpened softmax): low when the teacher uses a few prototypes for everything."""
    plugin = wrapped.plugin
    feats, _ = box_features(plugin.teacher, validation)
    logits = plugin._ema_head.module(feats)
    p = torch.softmax((logits - plugin._centre.value) / plugin.config.teacher_temperature, -1).mean(0)
    return float(-(p * p.clamp_min(1e-12).log()).sum())


def _schedule(optimizer, steps: int):
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))


def word_accuracy(recogniser, split: dict, batch: int = 100) -> float:
    from vlmdistill.data.rendered_words import to_pixel_values

    predicted = []
    recogniser.eval()
    for start in range(0, len(split["words"]), batch):
        predicted += recogniser.decode(to_pixel_values(split["images"][start:start + batch]))
    recogniser.train()
    return sum(p == w for p, w in zip(predicted, split["words"])) / len(split["words"])


def finetune(encoder, labelled: dict, validation: dict, test: dict, s: dict, seed: int) -> dict:
    """CTC recogniser, encoder + head trained (AdamW, warm-up + cosine, clipping 3). Every `check_every` steps it
    is scored on the validation split; the test accuracy reported is that of the best validation checkpoint."""
    from vlmdistill.eval.ctc_recognizer import CTCRecognizer
    from vlmdistill.data.rendered_words import to_pixel_values

    from .ccd_glyphs import LETTERS

    torch.manual_seed(seed)
    recogniser = CTCRecognizer(encoder, LETTERS)
    pixels, words = to_pixel_values(labelled["images"]), labelled["words"]
    steps, batch = s["finetune_steps"], min(s["finetune_batch"], len(words))
    optimizer = torch.optim.AdamW(recogniser.parameters(), lr=s["finetune_lr"], weight_decay=0.05)
    schedule = _schedule(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    recogniser.train()
    curve, best = [], (-1.0, 0, 0.0)
    for step in range(1, steps + 1):
        idx = torch.randperm(len(words), generator=g)[:batch]
        loss = recogniser.loss(pixels[idx], [words[i] for i in idx.tolist()])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(recogniser.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % s["check_every"] == 0 or step == steps:
            on_validation = word_accuracy(recogniser, validation)
            curve.append((step, on_validation, loss.item()))
            if on_validation > best[0]:
                best = (on_validation, step, word_accuracy(recogniser, test))
    return {"validation": best[0], "step": best[1], "test": best[2], "curve": curve}


def paired_t(a: list[float], b: list[float]) -> dict:
    """Paired t-test of a − b across seeds (two-sided)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2 or statistics.pstdev(d) == 0:
        return {"mean_difference": statistics.mean(d) if d else float("nan"), "t": float("nan"), "p": float("nan")}
    result = stats.ttest_rel(a, b)
    return {"mean_difference": statistics.mean(d), "t": float(result.statistic), "p": float(result.pvalue)}


def run(output_dir: str, seeds: list[int], quick: bool = False, with_finetune: bool = False) -> dict:
    from vlmdistill.plugins.ccd.masks import pseudo_text_masks
    from vlmdistill.data.rendered_words import to_pixel_values

    torch.set_num_threads(1)
    s = SETTINGS["quick" if quick else "full"]
    t0 = time.time()
    data = _data(s)
    pre, val, test = data["pretrain"], data["validation"], data["test"]
    labelled = {k: v[:s["labelled"]] for k, v in pre.items()}   # the first images of the pretraining set
    pseudo_iou = iou(pseudo_text_masks(_unit(to_pixel_values(test["images"])).clamp(0, 1)),
                     torch.from_numpy(test["masks"]))
    print(f"rendered {len(pre['words'])} unlabeled / {len(val['words'])} validation / {len(test['words'])} test "
          f"images in {time.time() - t0:.0f} s; k-means pseudo-mask IoU on test {pseudo_iou:.3f}", flush=True)
    rows = []
    for seed in seeds:
        encoders, row = {"scratch": tiny_encoder(s, 1000 + seed)}, {"seed": seed}
        for instances, arm in (("slices", "slices"), ("characters", "ccd")):
            t1 = time.time()
            wrapped, encoders[arm], logs = _pretrain(pre["images"], s, instances, seed, output_dir)
            row[f"{arm}/pretrain_seconds"] = time.time() - t1
            row[f"{arm}/log"] = logs
            row[f"{arm}/seg_iou"] = segmentation_iou(wrapped, test["images"], test["masks"])
            row[f"{arm}/teacher_mean_entropy"] = teacher_mean_entropy(wrapped, val)
            row[f"{arm}/teacher_entropy_end"] = logs[-1].get("distill/teacher_entropy", float("nan"))
            print(f"seed {seed} {arm:7s} pretraining {row[f'{arm}/pretrain_seconds']:.0f} s: loss "
                  f"{logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f}, teacher entropy "
                  f"{[round(h.get('distill/teacher_entropy', float('nan')), 2) for h in logs]} (ln K = "
                  f"{math.log(s['out_dim']):.2f}), mean-output entropy {row[f'{arm}/teacher_mean_entropy']:.2f}, "
                  f"segmentation IoU {row[f'{arm}/seg_iou']:.3f}", flush=True)
        for arm in ARMS:
            probe = row[f"{arm}/probe"] = character_probe(encoders[arm], labelled, val, test, seed)
            print(f"seed {seed} {arm:7s} probe {probe['test']:.3f} (wd {probe['weight_decay']:g})", flush=True)
            if with_finetune:
                tuned = row[f"{arm}/finetune"] = finetune(copy.deepcopy(encoders[arm]), labelled, val, test, s, seed)
                print(f"seed {seed} {arm:7s} fine-tuned word accuracy {tuned['test']:.3f} (step {tuned['step']}, "
                      f"validation {tuned['validation']:.3f})", flush=True)
        if with_finetune and seed == seeds[0]:   # is the rendering learnable? the recogniser on all labels
            row["all_labels"] = finetune(tiny_encoder(s, 2000 + seed), pre, val, test, s, seed)
            print(f"seed {seed} scratch on all {len(pre['words'])} labels: word accuracy "
                  f"{row['all_labels']['test']:.3f} (curve {row['all_labels']['curve']})", flush=True)
        rows.append(row)
    result = {"setting": {**s, "seeds": seeds, "quick": quick, "finetune": with_finetune},
              "pseudo_mask_iou": pseudo_iou, "runs": rows,
              "summary": summarise(rows), "seconds": time.time() - t0}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["load_average"] = os.getloadavg()
    _write(output_dir, result)
    return result


METRICS = {"segmentation IoU": lambda r, a: r.get(f"{a}/seg_iou"),
           "character probe (GT boxes)": lambda r, a: r[f"{a}/probe"]["test"],
           "fine-tuned word accuracy (10% labels)": lambda r, a: r.get(f"{a}/finetune", {}).get("test")}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for metric, get in METRICS.items():
        arms = [a for a in ARMS if get(rows[0], a) is not None]
        if not arms:
            continue
        values = {a: [get(r, a) for r in rows] for a in arms}
        out[metric] = {a: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                           "values": v} for a, v in values.items()}
        out[metric]["ccd - slices"] = paired_t(values["ccd"], values["slices"])
        if "scratch" in values:
            out[metric]["ccd - scratch"] = paired_t(values["ccd"], values["scratch"])
    return out


def _write(output_dir: str, result: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    s = result["summary"]
    lines = ["| metric | random init | slice distillation | CCD | CCD − slices (t, p) | CCD − random (t, p) |",
             "|---|---|---|---|---|---|"]
    for metric, entry in s.items():
        cells = [f"{entry[a]['mean']:.3f} ± {entry[a]['std']:.3f}" if a in entry else "–" for a in ARMS]
        tests = [f"{entry[k]['mean_difference']:+.3f} ({entry[k]['t']:.2f}, {entry[k]['p']:.3f})" if k in entry
                 else "–" for k in ("ccd - slices", "ccd - scratch")]
        lines.append(f"| {metric} | " + " | ".join(cells + tests) + " |")
    rows = result["runs"]
    lines.append(f"| k-means pseudo masks (the head's target), IoU | {result['pseudo_mask_iou']:.3f} | | | | |")
    for arm in ("slices", "ccd"):
        ent = [r[f"{arm}/teacher_mean_entropy"] for r in rows]
        lines.append(f"\nteacher mean-output entropy on validation characters, {arm}: "
                     f"{statistics.mean(ent):.2f} ± {statistics.stdev(ent) if len(ent) > 1 else 0:.2f} nats "
                     f"(ln K = {math.log(result['setting']['out_dim']):.2f})")
    if "all_labels" in rows[0]:
        lines.append(f"\nscratch on all labels (seed {rows[0]['seed']}): word accuracy "
                     f"{rows[0]['all_labels']['test']:.3f}, validation curve {rows[0]['all_labels']['curve']}")
    lines.append(f"\nseeds {result['setting']['seeds']}; {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} "
                 f"s CPU (1 thread; load average at the end {result['load_average'][0]:.1f})")
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    _plot(result, os.path.join(output_dir, "results.png"))
    print(table)


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(4 * len(summary), 3.2))
    for ax, (metric, entry) in zip(np.atleast_1d(axes), summary.items()):
        arms = [a for a in ARMS if a in entry]
        for i, arm in enumerate(arms):
            ax.bar(i, entry[arm]["mean"], yerr=entry[arm]["std"], color="#bbb", capsize=4)
            ax.plot([i] * len(entry[arm]["values"]), entry[arm]["values"], "k.", alpha=0.7)
        ax.set_xticks(range(len(arms)), arms)
        p = entry["ccd - slices"]["p"]
        ax.set_title(f"{metric}\nCCD vs slices: p = {p:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmdistill.eval.experiments.ccd_miniature",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/ccd-miniature")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune CTC recognisers (10%% labels; all labels from scratch on the first seed)")
    args = parser.parse_args(argv)
    run(args.output_dir, args.seeds, args.quick, args.finetune)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
