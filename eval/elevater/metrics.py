"""Classification metrics on a score matrix [N, C] (probabilities or logits), in numpy.

Written out rather than imported so that the definitions the toolkit uses (11-point interpolation,
classes without positives dropped) are explicit; the tests check each against scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from vlmdistill.errors import ConfigError

# ELEVATER metric name -> key in the metrics dict (CLIP_benchmark's names where they exist).
PRIMARY_KEYS = {
    "accuracy": "acc1",
    "mean-per-class": "mean_per_class_recall",
    "11point_mAP": "map_11point",
    "roc_auc": "roc_auc",
}


def primary_key(metric: str) -> str:
    try:
        return PRIMARY_KEYS[metric]
    except KeyError:
        raise ConfigError(f"unknown metric {metric!r}; valid: {sorted(PRIMARY_KEYS)}") from None


def to_multi_hot(labels: list[tuple[int, ...]] | np.ndarray, num_classes: int) -> np.ndarray:
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return labels.astype(np.int64)
    targets = np.zeros((len(labels), num_classes), dtype=np.int64)
    for row, positives in enumerate(labels):
        targets[row, list(np.atleast_1d(positives))] = 1
    return targets


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest scores (ties broken by class order)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == labels[:, None], axis=1)))


def multilabel_top1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of samples whose best-scoring class is one of their positives."""
    best = np.argmax(scores, axis=1)
    return float(np.mean(targets[np.arange(len(best)), best] > 0))


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """Balanced accuracy: recall averaged over the classes present in `labels`."""
    predicted = np.argmax(scores, axis=1)
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def _pr_points(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_pos = scores[order], positives[order]
    true_pos = np.cumsum(sorted_pos)
    # Tied scores form one threshold: keep the last index of each run of equal scores.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tp = true_pos[last_of_run]
    precision = tp / (last_of_run + 1)
    recall = tp / max(sorted_pos.sum(), 1)
    return precision, recall


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP: sum over thresholds of (recall step) x precision."""
    precision, recall = _pr_points(scores, positives.astype(bool))
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def interpolated_ap(scores: np.ndarray, positives: np.ndarray, points: int = 11) -> float:
    """N-point interpolated AP: mean over recall levels r of max precision at recall >= r (0 if none).

    As in the toolkit (which reads scikit-learn's curve), the curve includes its end point
    (recall 0, precision 1), so the level r = 0 always contributes 1.
    """
    precision, recall = _pr_points(scores, positives.astype(bool))
    precision, recall = np.r_[1.0, precision], np.r_[0.0, recall]
    levels = np.linspace(0.0, 1.0, points)
    values = [precision[recall >= r].max() if np.any(recall >= r) else 0.0 for r in levels]
    return float(np.mean(values))


def _classes_with_positives(targets: np.ndarray) -> np.ndarray:
    return np.flatnonzero(targets.sum(axis=0) > 0)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    classes = _classes_with_positives(targets)
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in classes]))


def map_11point(scores: np.ndarray, targets: np.ndarray) -> float:
    classes = _classes_with_positives(targets)
    return float(np.mean([interpolated_ap(scores[:, c], targets[:, c], 11) for c in classes]))


def binary_roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney form of the ROC AUC; tied scores count one half."""
    positives = positives.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Two classes: AUC of the positive (second) class score. More: macro one-vs-rest over classes
    that have both positives and negatives."""
    if scores.shape[1] == 2 and np.all(targets.sum(axis=1) == 1):
        return binary_roc_auc(scores[:, 1], targets[:, 1])
    values = [binary_roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def compute_metrics(scores: np.ndarray, labels: list[tuple[int, ...]], num_classes: int,
                    multilabel: bool) -> dict[str, float]:
    """Every metric that applies to the task, as fractions in [0, 1].

    Multi-class: acc1, acc5 (five or more classes), mean_per_class_recall, roc_auc, plus the
    ranking metrics. Multi-label: map_11point, mean_average_precision, roc_auc and acc1 (top
    prediction is a positive).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be [N, {num_classes}], got {scores.shape}")
    targets = to_multi_hot(labels, num_classes)
    metrics: dict[str, float] = {}
    if multilabel:
        metrics["acc1"] = multilabel_top1(scores, targets)
    else:
        single = np.array([positives[0] for positives in labels], dtype=np.int64)
        metrics["acc1"] = topk_accuracy(scores, single, 1)
        if num_classes >= 5:
            metrics["acc5"] = topk_accuracy(scores, single, 5)
        metrics["mean_per_class_recall"] = mean_per_class_recall(scores, single)
    metrics["map_11point"] = map_11point(scores, targets)
    metrics["mean_average_precision"] = mean_average_precision(scores, targets)
    metrics["roc_auc"] = roc_auc(scores, targets)
    return metrics
