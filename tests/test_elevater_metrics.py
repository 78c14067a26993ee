"""ELEVATER metrics against the toolkit's own evaluators (`vision-evaluation`), against scikit-learn,
and the oracle's perfect scores."""

import numpy as np
import pytest
import sklearn.metrics as sm
import vision_evaluation.evaluators as v_eval

from vlmdistill.eval.elevater import metrics
from vlmdistill.eval.elevater.agreement import Case, main as agreement_main, our_metrics, random_case, toolkit_metrics


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_every_metric_equals_the_toolkit_on_random_tied_inputs(kind):
    rng = np.random.default_rng({"binary": 0, "multiclass": 1, "multilabel": 2}[kind])
    compared = set()
    for _ in range(60):
        case = random_case(rng, kind)
        ours = our_metrics(case)
        for key, reference in toolkit_metrics(case).items():
            assert abs(ours[key] - reference) <= 1e-9, (kind, key, ours[key], reference)
            compared.add(key)
    expected = {"map_11point", "mean_average_precision"}
    if kind != "multilabel":
        expected |= {"acc1", "mean_per_class_recall"}
    expected |= {"binary": {"roc_auc"}, "multiclass": {"acc5"}, "multilabel": {"roc_auc"}}[kind]
    assert compared == expected


def test_the_cases_hold_what_they_promise():
    """Ties, absent classes and both dtypes really occur, so the comparison above covers them."""
    rng = np.random.default_rng(1)
    cases = [random_case(rng, "multiclass") for _ in range(60)]
    assert all(len(np.unique(c.scores)) < c.scores.size for c in cases)                     # ties
    assert sum(np.unique(c.targets).size < c.scores.shape[1] for c in cases) > 30            # absent classes
    assert {c.scores.dtype for c in cases} == {np.dtype(np.float32), np.dtype(np.float64)}
    multilabel = [random_case(rng, "multilabel") for _ in range(30)]
    assert sum((c.targets.sum(0) == 0).any() for c in multilabel) > 10


def test_11point_grid_keeps_precision_at_recall_exactly_three_tenths():
    # 10 positives; the 3rd positive comes at rank 3 (precision 1, recall exactly 0.3), then 7 negatives
    positives = np.array([1, 1, 1] + [0] * 7 + [1] * 7)
    scores = np.linspace(1.0, 0.0, len(positives))
    toolkit = v_eval.MeanAveragePrecisionNPointsEvaluator(11)
    toolkit.add_predictions(np.stack([1 - scores, scores], 1), np.stack([1 - positives, positives], 1))
    expected = np.mean([toolkit._calc_precision_recall_interp(scores, positives, np.linspace(1, 0, 11).tolist())])
    ours = metrics.interpolated_ap(scores, positives)
    assert ours == pytest.approx(expected, abs=1e-12)
    # the grid np.linspace(0, 1, 11) has 0.30000000000000004 > 0.3 and so loses the point: lower value
    precision, recall, _ = sm.precision_recall_curve(positives, scores)
    upward = np.mean([precision[recall >= r].max() for r in np.linspace(0, 1, 11)])
    assert upward < ours - 1e-3


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_drops_score_columns_of_absent_classes():
    # class 2 never occurs in the targets, but always holds the highest score
    scores = np.array([[0.3, 0.1, 0.6], [0.1, 0.3, 0.6], [0.2, 0.1, 0.7], [0.25, 0.2, 0.55]])
    labels = np.array([0, 1, 0, 1])
    assert metrics.mean_per_class_recall(scores, labels) == 0.75      # argmax over classes 0 and 1 only
    evaluator = v_eval.BalancedAccuracyScoreEvaluator()
    evaluator.add_predictions(scores, labels)
    assert evaluator.get_report()["balanced_accuracy"] == 0.75
    assert sm.balanced_accuracy_score(labels, scores.argmax(1)) == 0.0   # the plain definition differs


def test_top5_ties_are_broken_as_the_toolkit_breaks_them():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((500, 12)), 1)                     # many ties at the fifth score
    labels = rng.integers(0, 12, 500)
    evaluator = v_eval.TopKAccuracyEvaluator(5)
    evaluator.add_predictions(scores, labels)
    assert metrics.topk_accuracy(scores, labels, 5) == evaluator.get_report()["accuracy_top5"]
    stable = np.argsort(-scores, axis=1, kind="stable")[:, :5]     # "first class wins" gives another number
    assert np.mean(np.any(stable == labels[:, None], axis=1)) != metrics.topk_accuracy(scores, labels, 5)


def test_agreement_command_prints_every_metric(capsys):
    assert agreement_main(["--trials", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines} == {"acc1", "acc5", "map_11point", "mean_average_precision",
                                                  "mean_per_class_recall", "roc_auc"}
    assert all(float(line.split("=")[1].split()[0]) <= 1e-9 for line in lines)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untied_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores, labels = rng.random((300, 12)), rng.integers(0, 12, 300)
    for k in (1, 5):
        expected = sm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(12))
        assert metrics.topk_accuracy(scores, labels, k) == pytest.approx(expected)
    assert metrics.mean_per_class_recall(scores, labels) == pytest.approx(
        sm.balanced_accuracy_score(labels, scores.argmax(1)))
    targets = (rng.random((200, 9)) < 0.25).astype(int)
    targets[:, 3] = 0
    ml_scores = np.round(rng.random((200, 9)) + 0.5 * targets, 2)
    present = targets.sum(0) > 0
    assert metrics.mean_average_precision(ml_scores, targets) == pytest.approx(
        sm.average_precision_score(targets[:, present], ml_scores[:, present], average="macro"))
    assert metrics.roc_auc(ml_scores, targets) == pytest.approx(
        sm.roc_auc_score(targets[:, present], ml_scores[:, present], average="macro"))


def test_11point_differs_from_plain_ap():
    case = random_case(np.random.default_rng(5), "multilabel")
    assert metrics.map_11point(case.scores, case.targets) != pytest.approx(
        metrics.mean_average_precision(case.scores, case.targets))


def test_compute_metrics_keys_and_primary_keys():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((300, 12)), rng.integers(0, 12, 300)
    values = metrics.compute_metrics(scores, [(int(x),) for x in labels], 12, multilabel=False)
    assert {"acc1", "acc5", "mean_per_class_recall", "map_11point", "mean_average_precision", "roc_auc"} <= set(values)
    for name in ("accuracy", "mean-per-class", "11point_mAP", "roc_auc"):
        assert metrics.primary_key(name) in values
    two_class = metrics.compute_metrics(scores[:, :2], [(int(x) % 2,) for x in labels], 2, multilabel=False)
    assert "acc5" not in two_class
    assert our_metrics(Case("binary", scores[:, :2], labels % 2))["roc_auc"] == two_class["roc_auc"]


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
