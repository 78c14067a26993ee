"""Does CCD pretraining help a text recogniser that has few labels? (`vlmdistill demo ccd`)

Words from the Python standard library's docstrings are rendered with the fonts matplotlib ships into 32×128
images. A small CCD ViT is pretrained without labels with `plugin="ccd"` (HF Trainer + DistillationCallback);
its EMA teacher encoder then initialises a CTC recogniser that is fine-tuned on 1% and 10% of the pretraining
images' labels. The same recogniser trained from random initialisation on the same labels, steps and seeds
is the baseline. Reported: word accuracy and character accuracy (1 − mean normalised edit distance) on held-out
renderings of words from modules the training words never came from; and a character probe: a linear
classifier from the frozen encoder's pooled character features (k-means + connected-component slots, the
features CCD distils) to the character, trained on the same labelled images.
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

from vlmdistill.data.text_lmdb import CHARSET_36

SCALES = {
    # encoder, pretraining and fine-tuning sizes; "full" is sized for about 10 minutes on 2 CPU cores
    "full": dict(embed_dim=64, depth=4, heads=2, seg_blocks=[2, 3, 4], seg_hidden=32, seg_map=16, out_dim=2048,
                 head_hidden=256, bottleneck=64, pretrain_images=3000, pretrain_steps=100, pretrain_batch=32,
                 pretrain_lr=3e-4, finetune_steps=80, finetune_batch=16, finetune_lr=1e-3, eval_images=300),
    "quick": dict(embed_dim=32, depth=3, heads=2, seg_blocks=[1, 2, 3], seg_hidden=16, seg_map=8, out_dim=256,
                  head_hidden=64, bottleneck=32, pretrain_images=200, pretrain_steps=4, pretrain_batch=8,
                  pretrain_lr=1e-3, finetune_steps=4, finetune_batch=8, finetune_lr=1e-3, eval_images=16),
}
LABEL_FRACTIONS = (0.01, 0.10)
QUICK_WORDS = (["alpha", "beta", "gamma", "delta", "format", "string", "module", "return", "value", "object",
                "class", "method", "number", "python", "system", "default"],
               ["socket", "thread", "buffer", "encode", "parse", "token"])


def tiny_encoder(scale: dict, seed: int):
    """The demos' randomly initialised tiny CCD ViT (`embed_dim`, `depth`, `heads` from `scale`)."""
    from vlmdistill.plugins.ccd import ccd_vit

    torch.manual_seed(seed)
    return ccd_vit("tiny", embed_dim=scale["embed_dim"], depth=scale["depth"], num_heads=scale["heads"],
                   drop_path_rate=0.1)


def _data(scale: dict, quick: bool, seed: int = 0) -> dict:
    from vlmdistill.data.rendered_words import docstring_words, render_words

    train_words, held_words = QUICK_WORDS if quick else docstring_words()
    rng = np.random.default_rng(seed)
    pre_words = [train_words[i] for i in rng.integers(len(train_words), size=scale["pretrain_images"])]
    eval_words = [held_words[i] for i in rng.integers(len(held_words), size=scale["eval_images"])]
    return {"vocabulary": (len(train_words), len(held_words)),
            "pretrain": (render_words(pre_words, seed + 1), pre_words),
            "eval": (render_words(eval_words, seed + 2), eval_words),
            "order": np.random.default_rng(seed + 3).permutation(scale["pretrain_images"])}


def _pretrain(images: np.ndarray, scale: dict, output_dir: str, seed: int):
    from transformers import Trainer, TrainingArguments

    import vlmdistill
    from vlmdistill.plugins.ccd import teacher_encoder
    from vlmdistill.data.rendered_words import WordImages, collate_unlabeled

    steps = scale["pretrain_steps"]
    wrapped = vlmdistill.wrap(
        tiny_encoder(scale, seed), plugin="ccd", seg_blocks=scale["seg_blocks"], out_dim=scale["out_dim"],
        head_hidden_dim=scale["head_hidden"], bottleneck_dim=scale["bottleneck"],
        seg_hidden_channels=scale["seg_hidden"], seg_map_channels=scale["seg_map"],
        # A short run: a faster EMA than the paper's 0.9995 (whose teacher would barely move in a few hundred
        # steps), prototypes frozen for the first 10% of steps, pseudo masks throughout.
        teacher_momentum=0.99, freeze_last_layer_fraction=0.1, pseudo_mask_fraction=1.0)
    args = TrainingArguments(output_dir=os.path.join(output_dir, "pretrain"), max_steps=steps,
                             per_device_train_batch_size=scale["pretrain_batch"], learning_rate=scale["pretrain_lr"],
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.04,
                             max_grad_norm=3.0, logging_steps=max(1, steps // 10), save_strategy="no", report_to=[],
                             use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=wrapped, args=args, train_dataset=WordImages(images), data_collator=collate_unlabeled,
                      callbacks=[vlmdistill.DistillationCallback()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return teacher_encoder(wrapped), logs


def _cosine(optimizer, steps: int):
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _finetune(encoder, images: np.ndarray, words: list[str], scale: dict, seed: int):
    """Full fine-tuning: encoder and CTC head, AdamW with warm-up + cosine, gradient clipping 3."""
    from vlmdistill.eval.ctc_recognizer import CTCRecognizer
    from vlmdistill.data.rendered_words import to_pixel_values

    torch.manual_seed(seed)
    recogniser = CTCRecognizer(encoder)
    pixels = to_pixel_values(images)
    steps, batch = scale["finetune_steps"], scale["finetune_batch"]
    optimizer = torch.optim.AdamW(recogniser.parameters(), lr=scale["finetune_lr"], weight_decay=0.05)
    schedule = _cosine(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    recogniser.train()
    for _ in range(steps):
        idx = torch.randint(len(words), (min(batch, len(words)),), generator=g)
        loss = recogniser.loss(pixels[idx], [words[i] for i in idx.tolist()])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(recogniser.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return recogniser.eval()


@torch.no_grad()
def _character_features(encoder, images: np.ndarray, words: list[str], charset: str, batch: int = 64):
    """Pooled final-token features of the k-means + connected-component character slots of each image, labelled
    left to right from its word; only images whose slot count equals the word length are used."""
    from vlmdistill.data.image_stats import IMAGENET_MEAN, IMAGENET_STD, unnormalise
    from vlmdistill.data.rendered_words import to_pixel_values
    from vlmdistill.plugins.ccd.masks import character_slots, pool_characters, pseudo_text_masks, slot_token_weights

    pixels = to_pixel_values(images)
    unit = unnormalise(pixels, IMAGENET_MEAN, IMAGENET_STD)
    weights, present = slot_token_weights(character_slots(pseudo_text_masks(unit.clamp(0, 1))), (8, 32))
    encoder.eval()
    tokens = torch.cat([encoder(pixel_values=pixels[i:i + batch]).last_hidden_state
                        for i in range(0, len(pixels), batch)])
    pooled = pool_characters(tokens, weights)
    feats, labels, used = [], [], 0
    for i, word in enumerate(words):
        k = int(present[i].sum())
        if k == len(word):
            feats.append(pooled[i, :k])
            labels += [charset.index(c) for c in word]
            used += 1
    if not feats:
        return pooled.new_zeros(0, pooled.shape[-1]), torch.zeros(0, dtype=torch.long), 0.0
    return torch.cat(feats), torch.tensor(labels), used / len(words)


def _character_probe(train: tuple, evaluation: tuple, classes: int, seed: int, steps: int = 500) -> float:
    """Accuracy of a linear classifier from pooled character features to character identity (frozen encoder)."""
    x, y, _ = train
    x_eval, y_eval, _ = evaluation
    if len(y) < 2 or not len(y_eval):
        return float("nan")  # no image whose slots matched its word
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (linear((x_eval - mean) / std).argmax(-1) == y_eval).float().mean().item()


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _scores(predicted: list[str], words: list[str]) -> dict:
    """Word accuracy and character accuracy: 1 − mean normalised edit distance (distance / longer length)."""
    ned = [_edit_distance(p, w) / max(len(p), len(w), 1) for p, w in zip(predicted, words)]
    return {"word_accuracy": sum(p == w for p, w in zip(predicted, words)) / len(words),
            "char_accuracy": 1.0 - sum(ned) / len(words),
            "examples": [(w, p) for w, p in zip(words[:5], predicted[:5])]}


def evaluate(recogniser, images: np.ndarray, words: list[str], batch: int = 64) -> dict:
    from vlmdistill.data.rendered_words import to_pixel_values

    pixels = to_pixel_values(images)
    predicted = []
    for start in range(0, len(words), batch):
        predicted.extend(recogniser.decode(pixels[start:start + batch]))
    return _scores(predicted, words)


def run(output_dir: str, seeds: list[int], quick: bool = False, encoder_dir: str | None = None) -> dict:
    from vlmdistill.plugins.ccd import CCDViT

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scale = SCALES["quick" if quick else "full"]
    t0 = time.time()
    data = _data(scale, quick)
    pre_images, pre_words = data["pretrain"]
    eval_images, eval_words = data["eval"]
    print(f"rendered {len(pre_words)} unlabeled + {len(eval_words)} held-out images "
          f"({data['vocabulary'][0]} training / {data['vocabulary'][1]} held-out words) in {time.time() - t0:.0f} s")

    t1 = time.time()
    if encoder_dir:
        pretrained, logs = CCDViT.from_pretrained(encoder_dir), []
        print(f"CCD teacher encoder from {encoder_dir} (no pretraining)")
    else:
        pretrained, logs = _pretrain(pre_images, scale, output_dir, seed=0)
        pretrained.save_pretrained(os.path.join(output_dir, "ccd_teacher_encoder"))
        print(f"CCD pretraining: {scale['pretrain_steps']} steps in {time.time() - t1:.0f} s; loss "
              f"{logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f}, characters per image "
              f"{logs[-1].get('distill/paired_characters', float('nan')):.1f}")
    pretrain_seconds = time.time() - t1

    rows, eval_cache = [], {}  # eval-set character features per encoder
    for fraction in LABEL_FRACTIONS:
        n = max(2, int(round(fraction * len(pre_words))))
        subset = data["order"][:n]
        images, words = pre_images[subset], [pre_words[i] for i in subset]
        for seed in seeds:
            for arm in ("scratch", "ccd"):
                encoder = copy.deepcopy(pretrained) if arm == "ccd" else tiny_encoder(scale, 1000 + seed)
                key = arm if arm == "ccd" else f"scratch-{seed}"
                if key not in eval_cache:
                    eval_cache[key] = _character_features(encoder, eval_images, eval_words, CHARSET_36)
                t2 = time.time()
                chars = _character_probe(_character_features(encoder, images, words, CHARSET_36),
                                         eval_cache[key], len(CHARSET_36), seed)
                rows.append({"protocol": "characters", "labels": fraction, "labelled_images": n, "seed": seed,
                             "init": arm, "seconds": time.time() - t2, "char_accuracy": chars, "word_accuracy": None})
                t2 = time.time()
                tuned = evaluate(_finetune(encoder, images, words, scale, seed), eval_images, eval_words)
                rows.append({"protocol": "finetune", "labels": fraction, "labelled_images": n, "seed": seed,
                             "init": arm, "seconds": time.time() - t2, **tuned})
                print(f"{fraction:4.0%} labels ({n:4d} images) seed {seed} {arm:7s}: fine-tuned word/char "
                      f"{tuned['word_accuracy']:.3f}/{tuned['char_accuracy']:.3f}, character probe {chars:.3f}  "
                      f"e.g. {tuned['examples'][:2]}", flush=True)

    summary = {}
    for protocol in ("finetune", "characters"):
        for fraction in LABEL_FRACTIONS:
            for arm in ("scratch", "ccd"):
                sel = [r for r in rows if r["protocol"] == protocol and r["labels"] == fraction and r["init"] == arm]
                entry = {}
                for metric in ("word_accuracy", "char_accuracy"):
                    values = [r[metric] for r in sel if r[metric] is not None]
                    if not values:
                        continue
                    entry[metric] = statistics.mean(values)
                    entry[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[f"{protocol}/{fraction:.2f}/{arm}"] = entry
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"setting": {**scale, "seeds": seeds, "label_fractions": list(LABEL_FRACTIONS), "quick": quick,
                          "pretrain_seed": 0, "threads": torch.get_num_threads(), "encoder_dir": encoder_dir},
              "pretraining": {"seconds": pretrain_seconds, "log": logs},
              "runs": rows, "summary": summary, "seconds": time.time() - t0,
              # on a shared machine the wall time depends on the load; CPU time says what the run itself cost
              "cpu_seconds": usage.ru_utime + usage.ru_stime, "load_average": os.getloadavg()}
    _write(output_dir, result)
    return result


def _write(output_dir: str, result: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    s, st = result["summary"], result["setting"]
    titles = {"finetune": f"Fine-tuned CTC recogniser ({st['finetune_steps']} steps, batch {st['finetune_batch']})",
              "characters": "Character probe: linear classifier on the frozen encoder's pooled character features"}
    lines = []
    for protocol in ("finetune", "characters"):
        lines += [f"**{titles[protocol]}**", "", "| labels | encoder init | word accuracy | char accuracy |",
                  "|---|---|---|---|"]
        for fraction in st["label_fractions"]:
            n = next(r["labelled_images"] for r in result["runs"] if r["labels"] == fraction)
            for arm, label in (("scratch", "random (from scratch)"), ("ccd", "CCD teacher encoder")):
                e = s[f"{protocol}/{fraction:.2f}/{arm}"]
                word = (f"{e['word_accuracy']:.3f} ± {e['word_accuracy_std']:.3f}" if "word_accuracy" in e else "–")
                lines.append(f"| {fraction:.0%} ({n} images) | {label} | {word} | {e['char_accuracy']:.3f} ± "
                             f"{e['char_accuracy_std']:.3f} |")
        lines.append("")
    lines.append(f"seeds {st['seeds']} (fine-tuning; pretraining seed {st['pretrain_seed']}), "
                 f"pretraining {result['pretraining']['seconds']:.0f} s, total {result['seconds']:.0f} s wall, "
                 f"{result['cpu_seconds']:.0f} s CPU ({st['threads']} threads; load average at the end "
                 f"{result['load_average'][0]:.1f})")
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    from .plots import plot_ccd

    plot_ccd(result, os.path.join(output_dir, "results.png"))
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo ccd", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo-ccd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--encoder", default=None,
                        help="a saved CCD teacher encoder (e.g. OUTPUT_DIR/ccd_teacher_encoder): skip pretraining")
    args = parser.parse_args(argv)
    run(args.output_dir, args.seeds, args.quick, args.encoder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
