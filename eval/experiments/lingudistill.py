"""Does LinguDistill keep a VLM's language ability through multimodal fine-tuning? (`vlmdistill demo lingudistill`)

1. A small Llama LM is trained on real English (Python standard-library docstrings, split by module into
   training and held-out text); a small CLIP vision encoder is trained to recognise real digit images.
2. A LLaVA (`LlavaForConditionalGeneration`) is built from the encoder, a fresh projector and a copy of the LM.
3. It is fine-tuned on digit images with the HF Trainer, on a mix of captions ("a handwritten seven.",
   language-intensive) and digit questions ("which digit? → seven", vision-heavy), plus text-only blocks:
   once with plain cross-entropy, once wrapped with `plugin="lingudistill"` and the original LM as teacher
   (KD on captions and text, plain CE on questions), with the same data, steps and seeds.
4. Reported: held-out perplexity and next-token accuracy of the VLM's language model (text-only input), and
   digit accuracy (the VLM's most likely of the ten digit names after the question), before and after.
   Recovery = (S_lingudistill − S_finetuned) / (S_original − S_finetuned).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vlmdistill.data.text import language_scores, pack_examples, split_by_module, stdlib_docstrings, train_tokenizer

SETTINGS = {
    "full": dict(lm_steps=400, vision_steps=300, finetune_steps=300, text_blocks=256, held_blocks=160, test_images=450),
    "smoke": dict(lm_steps=30, vision_steps=20, finetune_steps=12, text_blocks=32, held_blocks=16, test_images=40),
}
#: `--quick` (what `make demo` runs): the full-scale experiment on one seed, so its table is a real result
QUICK_SEEDS = [0]
BLOCK = 64
VOCAB = 1024


@torch.no_grad()
def digit_accuracy(vlm, tasks, images: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    """Share of test images whose most likely answer among the ten digit names (summed log-probability of the
    answer tokens and EOS after the question) is the right one. The image + question prefix runs once; its KV
    cache is repeated for the ten candidates."""
    was_training = vlm.training
    vlm.eval()
    candidates = [tasks.tok.encode(tasks.qa_answer(d)) + [tasks.tok.eos_token_id] for d in range(10)]
    width = max(len(c) for c in candidates)
    cand = torch.zeros(10, width, dtype=torch.long)
    cand_mask = torch.zeros(10, width, dtype=torch.long)
    for d, c in enumerate(candidates):
        cand[d, : len(c)], cand_mask[d, : len(c)] = torch.tensor(c), 1
    correct = 0
    for start in range(0, images.shape[0], batch):
        imgs = images[start:start + batch]
        n = imgs.shape[0]
        prefix = torch.tensor(tasks.question(imgs[0], 0).input_ids[: -len(candidates[0])]).expand(n, -1)
        out = vlm(input_ids=prefix, pixel_values=imgs, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(10)
        ids = cand.repeat(n, 1)
        mask = torch.cat([torch.ones(n * 10, prefix.shape[1], dtype=torch.long), cand_mask.repeat(n, 1)], 1)
        logits = vlm(input_ids=ids, attention_mask=mask, cache=cache).logits.float()
        # token k of a candidate is predicted by the prefix's last position (k = 0) or candidate token k - 1
        first = out.logits[:, -1:].float().repeat_interleave(10, 0)
        logp = torch.log_softmax(torch.cat([first, logits[:, :-1]], 1), -1).gather(-1, ids[..., None])[..., 0]
        scores = (logp * cand_mask.repeat(n, 1)).sum(1).view(n, 10)
        correct += int((scores.argmax(1) == labels[start:start + batch]).sum())
    vlm.train(was_training)
    return correct / images.shape[0]


class DownweightedCE(torch.nn.Module):
    """Control arm: LinguDistill's CE weights (1 − α on the distilled categories) without any teacher, to tell
    the effect of the KD term from the effect of simply learning less from those samples."""

    def __init__(self, vlm, weights: dict[str, float]):
        super().__init__()
        self.vlm, self.weights = vlm, weights

    def forward(self, input_ids, attention_mask, labels, dataset, pixel_values=None):
        logits = self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=-100,
                                               reduction="none")
        w = torch.tensor([self.weights.get(d, 1.0) for d in dataset], device=ce.device)[:, None]
        return {"loss": (ce * w).sum() / (target != -100).sum().clamp_min(1)}


def fine_tune(vlm, samples, *, steps: int, seed: int, out: str, lingudistill: dict | None = None,
              ce_weights: dict[str, float] | None = None):
    """HF Trainer fine-tuning of the projector and the language model (the vision tower stays frozen)."""
    import vlmdistill
    from transformers import Trainer, TrainingArguments

    from vlmdistill.eval.experiments.toy_vlm import SampleDataset, collate_samples

    vlm.model.vision_tower.requires_grad_(False)
    model, callbacks = vlm, []
    collate = collate_samples
    if lingudistill is not None:
        model = vlmdistill.wrap(vlm, plugin="lingudistill", **lingudistill)
        callbacks = [vlmdistill.DistillationCallback()]
    elif ce_weights is not None:
        model = DownweightedCE(vlm, ce_weights)
    else:  # the plain model takes no dataset names
        def collate(samples):
            return {k: v for k, v in collate_samples(samples).items() if k != "dataset"}
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
                             logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], use_cpu=True,
                             seed=seed, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=True)
    trainer = Trainer(model=model, args=args, train_dataset=SampleDataset(samples), data_collator=collate,
                      callbacks=callbacks)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h]
    return (vlmdistill.unwrap(model) if lingudistill is not None else vlm), log


ARMS = ("finetuned", "lingudistill", "downweighted")


class TextVocabulary(torch.nn.Module):
    """The VLM read as a text LM over the original vocabulary: logits of the added image token are dropped, so
    before fine-tuning the VLM scores exactly what the original LM scores."""

    def __init__(self, vlm, vocab: int):
        super().__init__()
        self.vlm, self.vocab = vlm, vocab

    def forward(self, input_ids):
        out = self.vlm(input_ids=input_ids)
        out["logits"] = out.logits[..., : self.vocab]
        return out


def _scores(vlm, tasks, held, test_images, test_labels, vocab: int) -> dict:
    lang = language_scores(TextVocabulary(vlm, vocab), held)
    return {"perplexity": lang["perplexity"], "next_token_accuracy": lang["next_token_accuracy"],
            "digit_accuracy": digit_accuracy(vlm, tasks, test_images, test_labels)}


def _recovery(orig: float, finetuned: float, distilled: float) -> float:
    gap = orig - finetuned
    return (distilled - finetuned) / gap if abs(gap) > 1e-12 else float("nan")


def run(output_dir: str, seeds: list[int], smoke: bool = False, alpha: float = 0.5, text_share: bool = True,
        control: bool = False, threads: int = 1) -> dict:
    from vlmdistill.data.digits import load_digits_images
    from vlmdistill.eval.experiments.toy_vlm import (DIGIT_DATASETS, DigitTasks, IMAGE_TOKEN, image_tokens,
                                                         llava_from_parts, student_tokenizer, train_language_model,
                                                         train_vision_encoder)

    torch.set_num_threads(max(1, threads))
    scale = SETTINGS["smoke" if smoke else "full"]
    t0 = time.time()
    train_texts, held_texts = split_by_module(stdlib_docstrings())
    tokenizer = train_tokenizer(train_texts, vocab_size=VOCAB)
    train_blocks = pack_examples(train_texts, tokenizer, BLOCK)
    held = pack_examples(held_texts, tokenizer, BLOCK, max_blocks=scale["held_blocks"])
    print(f"corpus: {train_blocks.shape[0]} training / {held.shape[0]} held-out blocks of {BLOCK} tokens, "
          f"vocabulary {len(tokenizer)}", flush=True)
    lm = train_language_model(train_blocks, len(tokenizer), scale["lm_steps"])
    print(f"language model trained ({time.time() - t0:.0f} s)", flush=True)

    train_images, train_labels, test_images, test_labels = load_digits_images(size=16)
    test_images, test_labels = test_images[: scale["test_images"]], test_labels[: scale["test_images"]]
    vision = train_vision_encoder(train_images, train_labels, scale["vision_steps"])
    s_tok = student_tokenizer(tokenizer)
    image_id = s_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    tasks = DigitTasks(s_tok, image_tokens(vision))
    lm_scores = language_scores(lm, held)
    original = _scores(llava_from_parts(lm, vision, image_id), tasks, held, test_images, test_labels, len(tokenizer))
    print(f"VLM before fine-tuning: {original} ({time.time() - t0:.0f} s)", flush=True)

    distill_config = dict(teacher=lm, alpha=alpha, dataset_categories=dict(DIGIT_DATASETS),
                          student_tokenizer=s_tok, teacher_tokenizer=tokenizer)
    distilled = {name for name, cat in DIGIT_DATASETS.items() if cat in ("captioning", "text")}
    ce_weights = {name: 1.0 - alpha for name in distilled}
    arms = ARMS if control else ARMS[:2]
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        text = train_blocks[torch.randperm(train_blocks.shape[0], generator=g)[: scale["text_blocks"]]] \
            if text_share else None
        samples = tasks.mixture(train_images, train_labels, text, seed=seed)
        for arm in arms:
            torch.manual_seed(seed)
            vlm = llava_from_parts(lm, vision, image_id)
            vlm, log = fine_tune(vlm, samples, steps=scale["finetune_steps"], seed=seed,
                                 out=os.path.join(output_dir, f"run-{arm}-{seed}"),
                                 lingudistill=distill_config if arm == "lingudistill" else None,
                                 ce_weights=ce_weights if arm == "downweighted" else None)
            scores = _scores(vlm, tasks, held, test_images, test_labels, len(tokenizer))
            rows.append({"seed": seed, "arm": arm, **scores, "final_log": log[-1] if log else {}})
            print(f"seed {seed} {arm:13s}: perplexity {scores['perplexity']:.2f}  next-token accuracy "
                  f"{scores['next_token_accuracy']:.4f}  digit accuracy {scores['digit_accuracy']:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)

    result = {"setting": {**scale, "block": BLOCK, "vocab": len(tokenizer), "seeds": seeds, "alpha": alpha,
                          "text_share": text_share, "threads": threads, "language_model": "Llama 4x128 (2 kv heads)",
                          "vision": "CLIP 2x64, 16x16 digits, 16 image tokens"},
              "language_model": lm_scores, "original": original, "runs": rows, "summary": summarise(original, rows),
              "seconds": time.time() - t0}
    write_report(output_dir, result)
    return result


def summarise(original: dict, rows: list[dict]) -> dict:
    out = {}
    metrics = ("perplexity", "next_token_accuracy", "digit_accuracy")
    present = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    for arm in present:
        sel = [r for r in rows if r["arm"] == arm]
        out[arm] = {m: _mean_std([r[m] for r in sel]) for m in metrics}
    for arm in present[1:]:
        recov = {m: [] for m in ("perplexity", "next_token_accuracy")}
        digit_change = []
        for ft in (r for r in rows if r["arm"] == "finetuned"):
            other = next(r for r in rows if r["arm"] == arm and r["seed"] == ft["seed"])
            for m in recov:
                recov[m].append(_recovery(original[m], ft[m], other[m]))
            digit_change.append(other["digit_accuracy"] - ft["digit_accuracy"])
        out[f"recovery_{arm}"] = {m: _mean_std(v) for m, v in recov.items()}
        out[f"digit_accuracy_change_{arm}"] = _mean_std(digit_change)
    return out


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0, "values": values}


def write_report(output_dir: str, result: dict) -> str:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    s, o = result["summary"], result["original"]

    def cell(d, fmt):  # one seed: no spread to show
        return f"{d['mean']:{fmt}}" if len(d["values"]) == 1 else f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"

    lines = ["| model | held-out perplexity | next-token accuracy | digit accuracy |", "|---|---|---|---|",
             f"| VLM before fine-tuning (= original LM) | {o['perplexity']:.2f} | {o['next_token_accuracy']:.4f} | "
             f"{o['digit_accuracy']:.4f} |"]
    alpha = result["setting"]["alpha"]
    labels = {"finetuned": "plain fine-tuning", "lingudistill": f"LinguDistill (α={alpha})",
              "downweighted": f"control: CE × {1 - alpha:g} on the same samples, no teacher"}
    arms = [a for a in ARMS if a in s]
    for arm in arms:
        lines.append(f"| {labels[arm]} | {cell(s[arm]['perplexity'], '.2f')} | "
                     f"{cell(s[arm]['next_token_accuracy'], '.4f')} | {cell(s[arm]['digit_accuracy'], '.4f')} |")
    lines += ["", "| vs plain fine-tuning, per seed | recovery (perplexity) | recovery (next-token accuracy) | "
              "digit accuracy change (points) |", "|---|---|---|---|"]
    for arm in arms[1:]:
        r, d = s[f"recovery_{arm}"], s[f"digit_accuracy_change_{arm}"]
        points = {"mean": 100 * d["mean"], "std": 100 * d["std"], "values": d["values"]}
        lines.append(f"| {labels[arm]} | {cell(r['perplexity'], '.1%')} | {cell(r['next_token_accuracy'], '.1%')} | "
                     f"{cell(points, '+.1f')} |")
    lines += ["", "recovery = (S_arm − S_finetuned) / (S_original − S_finetuned), averaged over seeds",
              f"\nseeds {result['setting']['seeds']}, text-only share: {result['setting']['text_share']}, "
              f"{result['seconds']:.0f} s"]
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    from .plots import plot_lingudistill

    plot_lingudistill(result, os.path.join(output_dir, "results.png"))
    print(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo lingudistill", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo-lingudistill")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one seed at full scale: the recovery table in about two minutes (what `make demo` runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings for a smoke run (not a result)")
    parser.add_argument("--alpha", type=float, default=0.5, help="LinguDistill's KD weight on distilled samples")
    parser.add_argument("--no-text", action="store_true", help="fine-tune on the two image tasks only")
    parser.add_argument("--control", action="store_true",
                        help="also run the teacher-free control (the same CE down-weighting, no KD)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine; 2 on two idle cores)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else [0, 1, 2])
    run(args.output_dir, seeds, args.smoke, alpha=args.alpha, text_share=not args.no_text,
        control=args.control, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
