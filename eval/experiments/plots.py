"""A figure of each demo's result, drawn from its results object (what results.json holds), written beside
results.md. Bars are means over seeds with ± std error bars; dots are the single seeds; a dashed line marks the
reference a result is read against (the teacher, the model before fine-tuning).

    python -m vlmdistill.eval.experiments.plots kd runs/demo-kd/results.json     # redraw from a saved run
"""

from __future__ import annotations

import argparse
import json
import os

from vlmdistill.plots import bar_panel, new_figure, save_figure


def plot_kd(result: dict, path: str):
    s, runs = result["summary"], result["runs"]
    arms = list(s)
    labels = ["plain CE" if a == "plain" else a for a in arms]
    figure, axes = new_figure(1, 2, width=3.6, height=3.2)
    for ax, key, metric, title, percent in ((axes[0], "perplexity", "perplexity", "held-out perplexity", False),
                                            (axes[1], "accuracy", "next_token_accuracy", "next-token accuracy",
                                             True)):
        bar_panel(ax, labels, [s[a][f"{key}_mean"] for a in arms], [s[a][f"{key}_std"] for a in arms],
                  per_seed=[[r[metric] for r in runs if r["arm"] == a] for a in arms], title=title,
                  reference=(result["teacher"][metric], "teacher"), percent=percent)
    figure.suptitle(f"kd: student {result['setting']['student']}, teacher {result['setting']['teacher']}",
                    fontsize=9)
    save_figure(figure, path)
    return figure


def plot_lingudistill(result: dict, path: str):
    s, original = result["summary"], result["original"]
    arms = [a for a in ("finetuned", "lingudistill", "downweighted") if a in s]
    names = {"finetuned": "plain fine-tuning", "lingudistill": "LinguDistill", "downweighted": "CE down-weighted"}
    panels = (("perplexity", "held-out perplexity", False), ("next_token_accuracy", "next-token accuracy", True),
              ("digit_accuracy", "digit accuracy", True))
    recovered = [a for a in arms[1:] if f"recovery_{a}" in s]
    figure, axes = new_figure(1, len(panels) + bool(recovered), width=3.2, height=3.2)
    for ax, (metric, title, percent) in zip(axes, panels):
        bar_panel(ax, [names[a] for a in arms], [s[a][metric]["mean"] for a in arms],
                  [s[a][metric]["std"] for a in arms], per_seed=[s[a][metric]["values"] for a in arms],
                  title=title, reference=(original[metric], "before fine-tuning"), percent=percent)
    if recovered:
        recovery = [s[f"recovery_{a}"]["perplexity"] for a in recovered]
        bar_panel(axes[-1], [names[a] for a in recovered], [r["mean"] for r in recovery], [r["std"] for r in recovery],
                  per_seed=[r["values"] for r in recovery], title="lost perplexity recovered", percent=True)
    figure.suptitle(f"lingudistill: α={result['setting']['alpha']}, seeds {result['setting']['seeds']}", fontsize=9)
    save_figure(figure, path)
    return figure


DCCLIP_LABELS = {"logit distillation (CLIP-KD style)": "logit KD", "DC-CLIP + embedding term": "DC-CLIP + emb.",
                 "DC-CLIP + embedding term, one schedule across the stages": "DC-CLIP + emb.,\none schedule",
                 "from scratch, 10% of the pairs": "scratch, 10%",
                 "DC-CLIP, stage 2 on 10% of the pairs": "DC-CLIP, 10%",
                 "from scratch, English pairs only": "scratch, en only",
                 "DC-CLIP, stage 2 on English pairs only": "DC-CLIP,\nen-only stage 2"}


def plot_dcclip(results: dict, path: str):
    entries = results["summary"]
    models = [DCCLIP_LABELS.get(e["model"], e["model"].replace("student, ", "")) for e in entries]
    figure, axes = new_figure(1, 2, width=max(3.8, 0.55 * len(entries)), height=3.6)
    for ax, language, title in ((axes[0], "en", "zero-shot top-1, English prompts"),
                                (axes[1], "zh", "zero-shot top-1, Chinese prompts")):
        bar_panel(ax, models, [e[f"{language}_mean"] for e in entries], [e[f"{language}_std"] for e in entries],
                  per_seed=[[r[language] for r in results["rows"] if r["model"] == e["model"]] for e in entries],
                  title=title, percent=True)
    figure.suptitle("dcclip: bilingual digits, held-out images, prompt templates unseen in training", fontsize=9)
    save_figure(figure, path)
    return figure


MSD_LABELS = {"clip-b": "CLIP b", "clip-b-accum": "CLIP b×M accum.", "msd": "MSD b×M", "clip-Mb": "CLIP M·b",
              "msd-alpha0": "MSD, α 0", "msd-queue": "MSD, queue"}


def plot_msd(report: dict, path: str):
    summary = report["summary"]
    kinds = list(summary)
    panels = (("i2t_r1", "image→text R@1", True), ("probe_auc", "5-shot probe AUC", True),
              ("saved_activations_mb", "saved activations (MB)", False))
    panels = [p for p in panels if any(p[0] in summary[k] for k in kinds)]
    figure, axes = new_figure(1, len(panels), width=3.4, height=3.2)
    for ax, (metric, title, percent) in zip(axes, panels):
        shown = [k for k in kinds if metric in summary[k]]
        bar_panel(ax, [MSD_LABELS.get(k, k) for k in shown], [summary[k][metric][0] for k in shown],
                  [summary[k][metric][1] for k in shown],
                  per_seed=[[r[metric] for r in report["runs"] if r["run"] == k and r.get(metric) is not None]
                            for k in shown], title=title, percent=percent)
    s = report["settings"]
    figure.suptitle(f"msd: b={s['micro_batch']}, M={s['accumulation']}, {s['steps']} steps", fontsize=9)
    save_figure(figure, path)
    return figure


def plot_ccd(result: dict, path: str):
    s, st = result["summary"], result["setting"]
    fractions = st["label_fractions"]
    figure, axes = new_figure(1, 2, width=4.0, height=3.2)
    panels = ((axes[0], "finetune", "word_accuracy", "fine-tuned recogniser: word accuracy"),
              (axes[1], "characters", "char_accuracy", "character probe: accuracy"))
    for ax, protocol, metric, title in panels:
        labels, means, stds, dots = [], [], [], []
        for fraction in fractions:
            for arm, name in (("scratch", "scratch"), ("ccd", "CCD")):
                entry = s[f"{protocol}/{fraction:.2f}/{arm}"]
                labels.append(f"{fraction:.0%} labels, {name}")
                means.append(entry[metric])
                stds.append(entry[f"{metric}_std"])
                dots.append([r[metric] for r in result["runs"] if r["protocol"] == protocol
                             and r["labels"] == fraction and r["init"] == arm and r[metric] is not None])
        bar_panel(ax, labels, means, stds, per_seed=dots, title=title, percent=True)
    figure.suptitle("ccd: rendered words, encoder from scratch vs CCD pretraining", fontsize=9)
    save_figure(figure, path)
    return figure


PLOTS = {"kd": plot_kd, "lingudistill": plot_lingudistill, "dcclip": plot_dcclip, "msd": plot_msd, "ccd": plot_ccd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmdistill.eval.experiments.plots",
                                     description="Draw a demo's figure from its saved results JSON")
    parser.add_argument("demo", choices=sorted(PLOTS))
    parser.add_argument("results", help="the demo's results.json")
    parser.add_argument("--output", default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as fh:
        result = json.load(fh)
    path = args.output or os.path.splitext(args.results)[0] + ".png"
    PLOTS[args.demo](result, path)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
