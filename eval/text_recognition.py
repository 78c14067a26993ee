"""`vlmdistill eval str`: word accuracy of a text recogniser on text-recognition LMDBs.

The usual protocol of the six standard benchmarks (IIIT5K, SVT, IC13, IC15, SVTP, CUTE80): labels and predictions
lower-cased, every character that is not a letter or a digit dropped (36 characters), a word counts when the two
strings are then equal; samples whose label is empty under that protocol are left out (and counted). Every LMDB
found below each `--data` path is one dataset; the summary gives each one's accuracy, the mean over datasets and
the mean weighted by their sizes (the "average" of papers is one or the other: both are shown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = __doc__.split("\n\n", 1)[1]


def evaluate_dataset(recogniser, dataset, batch_size: int = 256, device: str = "cpu") -> dict:
    """Greedy-decode every image of a labelled `TextImageLMDB`; word accuracy under the 36-character protocol."""
    import torch

    from vlmdistill.data.text_lmdb import collate_text_images, word_accuracy

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_text_images)
    predictions, labels = [], []
    recogniser.to(device).eval()
    for batch in loader:
        predictions += recogniser.decode(batch["pixel_values"].to(device))
        labels += batch["text"]
    return {"samples": len(labels), "skipped": dataset.skipped, "word_accuracy": word_accuracy(predictions, labels),
            "examples": [(t, p) for t, p in zip(labels[:5], predictions[:5])]}


def evaluate(model_dir: str, data: list[str], batch_size: int = 256, device: str = "cpu") -> dict:
    from vlmdistill.data.text_lmdb import TextImageLMDB, find_text_lmdbs
    from vlmdistill.eval.ctc_recognizer import CTCRecognizer

    datasets = {}
    for root in data:   # every dataset is found and opened before the model is loaded
        for path in find_text_lmdbs(root):
            name = os.path.relpath(path, root) if path != root else os.path.basename(os.path.normpath(root))
            datasets[name] = TextImageLMDB(path, labelled=True, max_length=None)
    recogniser = CTCRecognizer.from_pretrained(model_dir)
    results = {name: evaluate_dataset(recogniser, ds, batch_size, device) for name, ds in datasets.items()}
    scored = [r for r in results.values() if r["samples"]]
    total = sum(r["samples"] for r in scored)
    summary = {"mean": sum(r["word_accuracy"] for r in scored) / len(scored) if scored else float("nan"),
               "weighted_mean": sum(r["word_accuracy"] * r["samples"] for r in scored) / total if total
               else float("nan"), "samples": total}
    return {"model": model_dir, "datasets": results, "summary": summary}


def markdown(report: dict) -> str:
    lines = ["| dataset | samples | skipped (empty label) | word accuracy % |", "|---|---|---|---|"]
    for name, r in report["datasets"].items():
        lines.append(f"| {name} | {r['samples']} | {r['skipped']} | {100 * r['word_accuracy']:.2f} |")
    s = report["summary"]
    lines.append(f"| mean over datasets | {s['samples']} | | {100 * s['mean']:.2f} |")
    lines.append(f"| weighted by samples | {s['samples']} | | {100 * s['weighted_mean']:.2f} |")
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a recogniser saved by vlmdistill.eval.ctc_recognizer.CTCRecognizer.save_pretrained")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="text-recognition LMDB folders, or roots with one LMDB per dataset below them")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default=None, help="write results.json and results.md here")


def run(args: argparse.Namespace) -> int:
    from vlmdistill.errors import VLMDistillError

    try:
        report = evaluate(args.model, args.data, args.batch_size, args.device)
    except (VLMDistillError, ImportError) as exc:
        print(f"vlmdistill eval str: {exc}", file=sys.stderr)
        return 2
    table = markdown(report)
    print(table)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
            json.dump(report, fh, indent=2)
        with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
            fh.write(table + "\n")
    return 0


def add_str_parser(subparsers) -> None:
    parser = subparsers.add_parser("str", help="scene-text recognition: word accuracy on LMDB benchmarks",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmdistill eval str", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
