"""Classification metrics on a score matrix [N, C] (probabilities or logits), in numpy.

Each ELEVATER metric follows the toolkit's evaluator (`vision-evaluation`, which the toolkit's
`vision_benchmark/evaluation/metric.py` calls) rule for rule, and the tests compare them with that
package on random inputs with ties, classes absent from the targets, binary and multi-label data:

* top-k accuracy: k = 1 is the first arg-max; k > 1 takes the k classes `np.argpartition` selects,
  so among classes tied at the k-th score the same ones count as in the toolkit;
* mean-per-class: classes without a test sample are dropped, score columns included, *before* the
  arg-max; then recall is averaged over the remaining classes;
* 11-point mAP: per class with positives, the running maximum of precision over the precision-recall
  curve (scikit-learn's points, ending at recall 0, precision 1) at the recall levels
  `np.linspace(1, 0, 11)` (whose 0.29999999999999993 keeps a point at recall exactly 0.3), averaged;
* ROC-AUC: two classes, the second column's score; otherwise macro over classes.
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


def top_k_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices of the k highest scores, chosen as the toolkit chooses them."""
    k = min(k, scores.shape[1])
    if k == 1:
        return np.argmax(scores, axis=1)[:, None]
    return np.argpartition(scores, -k, axis=1)[:, -k:]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the k classes `top_k_classes` picks."""
    return float(np.mean(np.any(top_k_classes(scores, k) == labels[:, None], axis=1)))


def multilabel_top1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of samples whose best-scoring class is one of their positives (not a toolkit metric)."""
    best = np.argmax(scores, axis=1)
    return float(np.mean(targets[np.arange(len(best)), best] > 0))


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """Balanced accuracy over the classes present in `labels`; a class without a test sample cannot
    be predicted either (its score column is dropped before the arg-max), as in the toolkit."""
    present = np.unique(labels)
    predicted = present[np.argmax(scores[:, present], axis=1)]
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in present]))


def _pr_points(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first; the same
    integer counts and divisions as scikit-learn's `precision_recall_curve`, so bit-identical."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_pos = scores[order], positives[order]
    true_pos = np.cumsum(sorted_pos)
    # Tied scores form one threshold: keep the last index of each run of equal scores.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tp = true_pos[last_of_run].astype(np.float64)
    precision = tp / (last_of_run + 1)
    recall = tp / max(float(sorted_pos.sum()), 1.0)
    return precision, recall


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP: sum over thresholds of (recall step) x precision."""
    precision, recall = _pr_points(scores, positives.astype(bool))
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def interpolated_ap(scores: np.ndarray, positives: np.ndarray, points: int = 11) -> float:
    """N-point interpolated AP: mean over recall levels r of the max precision at recall >= r
    (0 if none). The curve ends at (recall 0, precision 1), so the level r = 0 always counts 1; the
    levels are `np.linspace(1, 0, points)` exactly, whose rounding decides the points at recall 0.3,
    0.4, ... (the grid `np.linspace(0, 1, points)` would drop them)."""
    precision, recall = _pr_points(scores, positives.astype(bool))
    precision, recall = np.r_[1.0, precision], np.r_[0.0, recall]
    levels = np.linspace(1.0, 0.0, points)
    values = [precision[recall >= r].max() if np.any(recall >= r) else 0.0 for r in levels]
    return float(np.mean(values))


def _classes_with_positives(targets: np.ndarray) -> np.ndarray:
    return np.flatnonzero(targets.sum(axis=0) > 0)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    classes = _classes_with_positives(targets)
    if classes.size == 0:
        return 0.0   # the toolkit's value when no class has a positive
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in classes]))


def map_11point(scores: np.ndarray, targets: np.ndarray) -> float:
    classes = _classes_with_positives(targets)
    if classes.size == 0:
        return 0.0
    return float(np.mean([interpolated_ap(scores[:, c], targets[:, c], 11) for c in classes]))


def binary_roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney form of the ROC AUC; tied scores count one half."""
    positives = positives.astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Two classes: AUC of the positive (second) class score, the toolkit's ELEVATER metric. More:
    macro one-vs-rest over the classes that have both positives and negatives (where the toolkit,
    which passes the matrix to scikit-learn, refuses multi-class data and classes of one kind)."""
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
    prediction is a positive). The scores keep their dtype: every metric compares and counts, and
    `np.argpartition` is given the very array the toolkit would be given.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
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
