"""Writing results: one JSON per (model, dataset, language), a summary table (CSV + Markdown) with
the 20-dataset average, a bar chart, and the toolkit's per-image prediction file."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from .tasks import ELEVATER_IC20


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def result_filename(result: dict) -> str:
    return f"{_slug(result['model'])}__{_slug(result['dataset'])}__{result['language']}.json"


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


def summary_rows(results: Sequence[dict]) -> list[dict]:
    rows = []
    for r in sorted(results, key=lambda r: (r["model"], r["language"], _order(r["dataset"]))):
        rows.append({"model": r["model"], "language": r["language"], "protocol": r["protocol"]["name"],
                     "dataset": r["dataset"], "metric": r["primary_metric"],
                     "score": _pct(r["primary_value"]), "acc1": _pct(r["metrics"].get("acc1")),
                     "elevater_metric": r["elevater_metric"], "elevater_score": _pct(r.get("elevater_metric_value")),
                     "samples": r["num_samples"]})
    groups = defaultdict(list)
    for r in results:
        groups[(r["model"], r["language"], r["protocol"]["name"])].append(r)
    for (model, language, protocol), group in sorted(groups.items()):
        mean, count = benchmark_average(group)
        if count:
            rows.append({"model": model, "language": language, "protocol": protocol,
                         "dataset": f"ELEVATER average ({count}/{len(ELEVATER_IC20)})", "metric": "primary",
                         "score": _pct(mean), "acc1": "", "elevater_metric": "", "elevater_score": "",
                         "samples": sum(r["num_samples"] for r in group if r["dataset"] in ELEVATER_IC20)})
    return rows


def _order(dataset: str) -> tuple:
    return (0, ELEVATER_IC20.index(dataset)) if dataset in ELEVATER_IC20 else (1, dataset)


def _pct(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def write_summary(results: Sequence[dict], out_dir: str, stem: str = "summary") -> tuple[str, str]:
    """`summary.csv` and `summary.md`: one row per result (percent), then one average row per model."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summary_rows(results)
    columns = ["model", "language", "protocol", "dataset", "metric", "score", "acc1", "elevater_metric",
               "elevater_score", "samples"]
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for row in rows:
            handle.write("| " + " | ".join(str(row[c]) for c in columns) + " |\n")
    return csv_path, md_path


def plot_results(results: Sequence[dict], path: str, title: str = "Zero-shot classification") -> str:
    """Grouped bar chart: datasets on the x axis, one bar per (model, language, protocol); each bar is
    the protocol's primary metric (the dataset's own metric, or top-1 for `cnclip_zh`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results}, key=_order)
    series = sorted({(r["model"], r["language"], r["protocol"]["name"]) for r in results})
    value = {(r["model"], r["language"], r["protocol"]["name"], r["dataset"]): r["primary_value"] for r in results}
    width = 0.8 / max(len(series), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * len(datasets) * max(1, len(series)) + 2), 4.5))
    for i, (model, language, protocol) in enumerate(series):
        heights = [100 * (value.get((model, language, protocol, d)) or 0.0) for d in datasets]
        axis.bar(np.arange(len(datasets)) + i * width, heights, width, label=f"{model} [{language}, {protocol}]")
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


def write_predictions(path: str, result: dict, scores: np.ndarray, labels: Sequence[Sequence[int]],
                      multilabel: bool, precision: int = 6) -> str:
    """The toolkit's prediction record: per-image score rows in dataset order (`test_predictions`,
    also as `predictions` for its submission combiner), labels and arg-max indices."""
    rows = np.round(np.asarray(scores, dtype=np.float64), precision).tolist()
    if multilabel:
        label_rows = [[1 if c in set(positives) else 0 for c in range(len(rows[0]))] for positives in labels]
    else:
        label_rows = [int(positives[0]) for positives in labels]
    record = {
        "dataset_name": result["dataset"],
        "model_name": result["model"],
        "task": "zero_shot",
        "result": result["elevater_metric_value"],
        "metric": result["elevater_metric"],
        "test_predictions": rows,
        "predictions": [rows],
        "image_labels": label_rows,
        "max_label_indices": np.argmax(scores, axis=1).tolist(),
        "rnd_seeds": [0],
        "num_trainable_params": 0,
        "n_train_sample": 0,
        "language": result["language"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(record), handle)
    return path
