"""Writing results: one JSON per (run, dataset, language), a summary that puts several runs side by
side (CSV + Markdown) with the 20-dataset average, a bar chart, and the toolkit's prediction files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from vlmdistill.extras import require

from .tasks import ELEVATER_IC20

# The keys of the toolkit's per-dataset prediction file, in its order (`vision_benchmark/commands/
# zeroshot.py`); its `prepare_submit` merges `rnd_seeds` and `predictions`, averages
# `num_trainable_params` and requires every other key to be equal across the files of a dataset.
PREDICTION_KEYS = ("model_name", "dataset_name", "num_trainable_params", "num_params", "num_visual_params",
                   "num_backbone_params", "n_shot", "rnd_seeds", "predictions")
_GENERIC_CHECKPOINT_NAMES = {"model", "pytorch_model", "open_clip_model", "open_clip_pytorch_model", "checkpoint"}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def run_label_of(result: dict) -> str:
    return result.get("run_label") or result["model"]   # records written before run labels existed


def default_run_label(model_name: str, pretrained: str, fingerprint: str, protocol: dict,
                      random_weights: bool = False) -> str:
    """`<checkpoint name>-<8 hex>`: the name says which checkpoint, the hash (of the weights and of
    every protocol knob) tells apart two checkpoints of one name or one model under two protocols."""
    name = model_name
    if random_weights:
        name = f"{model_name}-random"
    elif pretrained and os.path.isfile(pretrained):
        stem = os.path.splitext(os.path.basename(pretrained))[0]
        parent = os.path.basename(os.path.dirname(os.path.abspath(pretrained)))
        name = f"{model_name}-{parent if stem in _GENERIC_CHECKPOINT_NAMES else stem}"
    digest = hashlib.sha256(json.dumps({"weights": fingerprint, "protocol": protocol}, sort_keys=True).encode())
    return f"{slug(name)}-{digest.hexdigest()[:8]}"


def result_filename(result: dict) -> str:
    return f"{slug(run_label_of(result))}__{slug(result['dataset'])}__{result['language']}.json"


def predictions_path(out_dir: str, run_label: str, language: str, dataset: str) -> str:
    """One folder per run and language, as the toolkit's `prepare_submit --combine_path` wants it."""
    return os.path.join(out_dir, "predictions", f"{slug(run_label)}__{language}", f"{dataset}.json")


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None   # JSON has no NaN; a metric that does not apply is null
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_result_json(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, result_filename(result))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(result), handle, indent=2, ensure_ascii=False)
    return path


def load_results(paths: Iterable[str]) -> list[dict]:
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            results.append(json.load(handle))
    return results


def benchmark_average(results: Sequence[dict]) -> tuple[float | None, int]:
    """Mean of the primary metric over the ELEVATER-20 datasets present, and how many were present."""
    values = [r["primary_value"] for r in results if r["dataset"] in ELEVATER_IC20 and r["primary_value"] is not None]
    return (float(np.mean(values)) if values else None), len(values)


def _series(result: dict) -> tuple[str, str, str]:
    return run_label_of(result), result["language"], result["protocol"]["name"]


def _series_name(series: tuple[str, str, str]) -> str:
    label, language, protocol = series
    return f"{label} [{language}, {protocol}]"


def summary_rows(results: Sequence[dict]) -> list[dict]:
    """One row per result (percent), then one "ELEVATER average (n/20)" row per run and language."""
    rows = []
    for r in sorted(results, key=lambda r: (_series(r), _order(r["dataset"]))):
        rows.append({"run_label": run_label_of(r), "model": r["model"], "language": r["language"],
                     "protocol": r["protocol"]["name"], "dataset": r["dataset"], "metric": r["primary_metric"],
                     "score": _pct(r["primary_value"]), "acc1": _pct(r["metrics"].get("acc1")),
                     "elevater_metric": r["elevater_metric"], "elevater_score": _pct(r.get("elevater_metric_value")),
                     "samples": r["num_samples"]})
    groups = defaultdict(list)
    for r in results:
        groups[_series(r)].append(r)
    for (label, language, protocol), group in sorted(groups.items()):
        mean, count = benchmark_average(group)
        if count:
            rows.append({"run_label": label, "model": group[0]["model"], "language": language, "protocol": protocol,
                         "dataset": f"ELEVATER average ({count}/{len(ELEVATER_IC20)})", "metric": "primary",
                         "score": _pct(mean), "acc1": "", "elevater_metric": "", "elevater_score": "",
                         "samples": sum(r["num_samples"] for r in group if r["dataset"] in ELEVATER_IC20)})
    return rows


def comparison_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Datasets down, runs across (primary metric, percent), then each run's ELEVATER average (when a
    run has any of the 20 datasets)."""
    series = sorted({_series(r) for r in results})
    datasets = sorted({r["dataset"] for r in results}, key=_order)
    value = {(_series(r), r["dataset"]): r for r in results}
    header = ["dataset", "metric"] + [_series_name(s) for s in series]
    rows = []
    for dataset in datasets:
        any_result = next(value[(s, dataset)] for s in series if (s, dataset) in value)
        rows.append([dataset, any_result["elevater_metric"]]
                    + [_pct(value[(s, dataset)]["primary_value"]) if (s, dataset) in value else "" for s in series])
    averages = [benchmark_average([r for r in results if _series(r) == s]) for s in series]
    if any(count for _, count in averages):
        rows.append(["ELEVATER average", "primary"]
                    + [f"{_pct(mean)} ({count}/{len(ELEVATER_IC20)})" if count else "" for mean, count in averages])
    return header, rows


def _order(dataset: str) -> tuple:
    return (0, ELEVATER_IC20.index(dataset)) if dataset in ELEVATER_IC20 else (1, dataset)


def _pct(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


SUMMARY_COLUMNS = ["run_label", "model", "language", "protocol", "dataset", "metric", "score", "acc1",
                   "elevater_metric", "elevater_score", "samples"]


def write_summary(results: Sequence[dict], out_dir: str, stem: str = "summary") -> tuple[str, str]:
    """`summary.csv`: one row per result and one average row per run (percent). `summary.md`: the
    runs side by side, datasets down, then every result row."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summary_rows(results)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header, table = comparison_table(results)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write("Each cell: the run's primary metric in percent (the dataset's ELEVATER metric; top-1 for "
                     "`cnclip_zh`).\n\n")
        handle.write(_markdown(header, table))
        handle.write("\nAll results:\n\n")
        handle.write(_markdown(SUMMARY_COLUMNS, [[str(row[c]) for c in SUMMARY_COLUMNS] for row in rows]))
    return csv_path, md_path


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_results(results: Sequence[dict], path: str, title: str = "Zero-shot classification") -> str:
    """Grouped bar chart: datasets on the x axis, one bar per run (label, language, protocol); each bar
    is the protocol's primary metric (the dataset's own metric, or top-1 for `cnclip_zh`)."""
    matplotlib = require("matplotlib", "the ELEVATER report's figure")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results}, key=_order)
    series = sorted({_series(r) for r in results})
    value = {(_series(r), r["dataset"]): r["primary_value"] for r in results}
    width = 0.8 / max(len(series), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * len(datasets) * max(1, len(series)) + 2), 4.5))
    for i, s in enumerate(series):
        heights = [100 * (value.get((s, d)) or 0.0) for d in datasets]
        axis.bar(np.arange(len(datasets)) + i * width, heights, width, label=_series_name(s))
    axis.set_xticks(np.arange(len(datasets)) + width * (len(series) - 1) / 2)
    axis.set_xticklabels(datasets, rotation=45, ha="right")
    axis.set_ylabel("primary metric (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    axis.legend(fontsize="small")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def prediction_record(result: dict, scores: np.ndarray, precision: int = 6) -> dict:
    """The toolkit's per-dataset prediction record: the keys of `PREDICTION_KEYS` only, the scores
    once, as `predictions` [1 (one seed), N images in dataset order, C classes], each value rounded to
    `precision` decimals as the toolkit writes them."""
    info = result.get("model_info", {})
    rows = [[round(float(x), precision) for x in row] for row in np.asarray(scores, dtype=np.float64)]
    record = {
        "model_name": run_label_of(result),
        "dataset_name": result["dataset"],
        "num_trainable_params": 0,
        "num_params": info.get("num_params"),
        "num_visual_params": info.get("num_visual_params"),
        "num_backbone_params": info.get("num_backbone_params"),
        "n_shot": 0,
        "rnd_seeds": [0],
        "predictions": [rows],
    }
    assert tuple(record) == PREDICTION_KEYS
    return record


def write_predictions(path: str, result: dict, scores: np.ndarray) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(prediction_record(result, scores)), handle)
    return path
