"""Does logit distillation help a small LM trained on little data? (`vlmdistill demo kd`)

Real English prose (Python standard-library docstrings) is split by module into training and held-out
text. A teacher LM is trained on all training text; a 4× smaller student is trained on a small subset,
once with plain next-token cross-entropy and once wrapped with `plugin="kd"`, with the real HF Trainer
and the same steps, data and seeds. Reported: held-out perplexity and next-token accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vlmdistill.data.text import language_scores, pack_examples, split_by_module, stdlib_docstrings, train_tokenizer


def _llama(vocab: int, layers: int, hidden: int, heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        tie_word_embeddings=True))


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        b = self.blocks[i]
        return {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b}


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _train(model, blocks, *, steps: int, batch: int, lr: float, seed: int, out: str, callbacks=()):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
                             logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True,
                             seed=seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks), data_collator=_collate,
                      callbacks=list(callbacks))
    trainer.train()
    return trainer.state.log_history


def _teacher(vocab: int, blocks: torch.Tensor, scale: dict, output_dir: str):
    """Train the teacher, or load the one a previous run with the same settings saved."""
    from transformers import LlamaForCausalLM

    path = os.path.join(output_dir, f"teacher-{scale['teacher_steps']}x{scale['teacher_batch']}-v{vocab}")
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"reusing the teacher saved in {path}")
        return LlamaForCausalLM.from_pretrained(path)
    teacher = _llama(vocab, layers=4, hidden=128, heads=4, seed=1234)
    _train(teacher, blocks, steps=scale["teacher_steps"], batch=scale["teacher_batch"], lr=3e-3, seed=1234,
           out=os.path.join(output_dir, "teacher-run"))
    teacher.save_pretrained(path)
    return teacher


def run(output_dir: str, seeds: list[int], alphas: list[float], quick: bool = False) -> dict:
    import vlmdistill

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scale = dict(teacher_steps=40, teacher_batch=16, student_steps=30, subset=64, held=32) if quick else \
        dict(teacher_steps=500, teacher_batch=32, student_steps=150, subset=256, held=192)
    t0 = time.time()
    train_texts, held_texts = split_by_module(stdlib_docstrings())
    tokenizer = train_tokenizer(train_texts, vocab_size=1024)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))  # for configs/kd/demo.yaml
    block = 64
    train_blocks = pack_examples(train_texts, tokenizer, block)
    held_blocks = pack_examples(held_texts, tokenizer, block, max_blocks=scale["held"])
    vocab = len(tokenizer)
    print(f"corpus: {train_blocks.shape[0]} training blocks, {held_blocks.shape[0]} held-out blocks of {block} "
          f"tokens, vocabulary {vocab}")

    teacher = _teacher(vocab, train_blocks, scale, output_dir)
    teacher_scores = language_scores(teacher, held_blocks)
    print(f"teacher ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params): {teacher_scores}")

    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        subset = train_blocks[torch.randperm(train_blocks.shape[0], generator=g)[: scale["subset"]]]
        for arm in ["plain", *[f"kd α={a}" for a in alphas]]:
            student = _llama(vocab, layers=2, hidden=64, heads=4, seed=seed)
            model, callbacks = student, ()
            if arm != "plain":
                alpha = float(arm.split("=")[1])
                model = vlmdistill.wrap(student, plugin="kd", teacher=teacher, alpha=alpha, temperature=1.0)
                callbacks = (vlmdistill.DistillationCallback(),)
            _train(model, subset, steps=scale["student_steps"], batch=16, lr=3e-3, seed=seed,
                   out=os.path.join(output_dir, "student-run"), callbacks=callbacks)
            if arm != "plain":
                student = vlmdistill.unwrap(model)
            scores = language_scores(student, held_blocks)
            rows.append({"seed": seed, "arm": arm, **scores})
            print(f"seed {seed} {arm:9s}: perplexity {scores['perplexity']:.2f}  "
                  f"next-token accuracy {scores['next_token_accuracy']:.4f}")

    summary = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        ppl = torch.tensor([r["perplexity"] for r in sel])
        acc = torch.tensor([r["next_token_accuracy"] for r in sel])
        summary[arm] = {"perplexity_mean": ppl.mean().item(), "perplexity_std": ppl.std().item() if len(sel) > 1
                        else 0.0, "accuracy_mean": acc.mean().item(),
                        "accuracy_std": acc.std().item() if len(sel) > 1 else 0.0}
    result = {"setting": {**scale, "block": block, "vocab": vocab, "seeds": seeds, "alphas": alphas, "temperature": 1.0,
                          "teacher": "Llama 4x128", "student": "Llama 2x64"},
              "teacher": teacher_scores, "runs": rows, "summary": summary, "seconds": time.time() - t0}
    _write(output_dir, result)
    return result


def _write(output_dir: str, result: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    s = result["summary"]
    lines = ["| model | held-out perplexity | next-token accuracy |", "|---|---|---|",
             f"| teacher (all training text) | {result['teacher']['perplexity']:.2f} | "
             f"{result['teacher']['next_token_accuracy']:.4f} |"]
    for arm in s:
        label = "student, plain CE" if arm == "plain" else f"student, {arm}"
        lines.append(f"| {label} | {s[arm]['perplexity_mean']:.2f} ± {s[arm]['perplexity_std']:.2f} | "
                     f"{s[arm]['accuracy_mean']:.4f} ± {s[arm]['accuracy_std']:.4f} |")
    lines.append(f"\nseeds {result['setting']['seeds']}, {result['seconds']:.0f} s")
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    from .plots import plot_kd

    plot_kd(result, os.path.join(output_dir, "results.png"))
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill demo kd", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo-kd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.9], help="one kd arm per α")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args(argv)
    run(args.output_dir, args.seeds, args.alphas, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
