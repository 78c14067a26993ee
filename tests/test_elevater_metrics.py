"""ELEVATER metrics against scikit-learn on random inputs, and the oracle's perfect scores."""

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, precision_recall_curve,
                             roc_auc_score, top_k_accuracy_score)

from vlmdistill.eval.elevater import metrics


def _random_multiclass(seed, n=300, classes=12):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes))
    labels = rng.integers(0, classes, n)
    return scores, labels


def _random_multilabel(seed, n=200, classes=9):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < 0.25).astype(int)
    targets[:, 3] = 0                                  # a class without positives: must be dropped
    scores = rng.random((n, classes)) + 0.5 * targets  # informative but imperfect
    return np.round(scores, 2), targets


def _sklearn_11point(scores, positives):
    """The toolkit's definition, written against scikit-learn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(positives, scores)
    return np.mean([precision[recall >= r].max() for r in np.linspace(0, 1, 11)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_accuracy_matches_sklearn(seed):
    scores, labels = _random_multiclass(seed)
    for k in (1, 5):
        expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(scores.shape[1]))
        assert metrics.topk_accuracy(scores, labels, k) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_per_class_recall_matches_sklearn(seed):
    scores, labels = _random_multiclass(seed)
    expected = balanced_accuracy_score(labels, scores.argmax(1))
    assert metrics.mean_per_class_recall(scores, labels) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_plain_map_matches_sklearn_and_drops_empty_classes(seed):
    scores, targets = _random_multilabel(seed)
    present = targets.sum(0) > 0
    expected = average_precision_score(targets[:, present], scores[:, present], average="macro")
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_11point_map_matches_sklearn_curve(seed):
    scores, targets = _random_multilabel(seed)
    expected = np.mean([_sklearn_11point(scores[:, c], targets[:, c])
                        for c in range(targets.shape[1]) if targets[:, c].any()])
    assert metrics.map_11point(scores, targets) == pytest.approx(expected)
    assert 0.0 < metrics.map_11point(scores, targets) < 1.0


def test_11point_differs_from_plain_ap():
    scores, targets = _random_multilabel(5)
    assert metrics.map_11point(scores, targets) != pytest.approx(metrics.mean_average_precision(scores, targets))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_roc_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    probabilities = np.round(rng.random(150), 2)          # ties included
    scores = np.stack([1 - probabilities, probabilities], axis=1)
    labels = (rng.random(150) < probabilities).astype(int)
    targets = np.eye(2, dtype=int)[labels]
    assert metrics.roc_auc(scores, targets) == pytest.approx(roc_auc_score(labels, probabilities))


def test_multilabel_roc_auc_is_macro_over_classes_with_both_kinds():
    scores, targets = _random_multilabel(7)
    present = targets.sum(0) > 0
    expected = roc_auc_score(targets[:, present], scores[:, present], average="macro")
    assert metrics.roc_auc(scores, targets) == pytest.approx(expected)


def test_compute_metrics_keys_and_primary_keys():
    scores, labels = _random_multiclass(0)
    values = metrics.compute_metrics(scores, [(int(x),) for x in labels], scores.shape[1], multilabel=False)
    assert {"acc1", "acc5", "mean_per_class_recall", "map_11point", "mean_average_precision", "roc_auc"} <= set(values)
    for name in ("accuracy", "mean-per-class", "11point_mAP", "roc_auc"):
        assert metrics.primary_key(name) in values
    two_class = metrics.compute_metrics(scores[:, :2], [(int(x) % 2,) for x in labels], 2, multilabel=False)
    assert "acc5" not in two_class


def test_oracle_scores_are_perfect_on_every_metric():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 100)
    one_hot = np.eye(10)[labels]
    single = metrics.compute_metrics(one_hot, [(int(x),) for x in labels], 10, multilabel=False)
    assert single == {key: 1.0 for key in single}
    targets = (rng.random((60, 6)) < 0.4).astype(int)
    targets[np.arange(60), rng.integers(0, 6, 60)] = 1
    multi = metrics.compute_metrics(targets / np.linalg.norm(targets, axis=1, keepdims=True),
                                    [tuple(np.flatnonzero(t)) for t in targets], 6, multilabel=True)
    assert multi == {key: 1.0 for key in multi}
