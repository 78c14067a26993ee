"""Agreement of `metrics.py` with the ELEVATER toolkit's own evaluators (package `vision-evaluation`,
called the way the toolkit's `vision_benchmark/evaluation/metric.py` calls it).

    python -m vlmdistill.eval.elevater.agreement [--trials 200] [--seed 0]

prints, per metric, the largest absolute difference over random score matrices with heavy ties,
classes absent from the targets, binary, multi-class and multi-label data, in float32 and float64.
`vision-evaluation` is a test dependency (the `dev` extra), not needed to run evaluations.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from vlmdistill.extras import require

from . import metrics


@dataclass
class Case:
    kind: str                 # "binary" | "multiclass" | "multilabel"
    scores: np.ndarray        # [N, C]
    targets: np.ndarray       # [N] class indices, or [N, C] multi-hot


def random_case(rng: np.random.Generator, kind: str) -> Case:
    """Scores rounded to few levels (many ties), softmax-like or raw, float32 or float64; some classes
    never occur in the targets; multi-label rows may have no positive at all."""
    n = int(rng.integers(5, 400))
    classes = 2 if kind == "binary" else int(rng.integers(3, 40))
    raw = rng.random((n, classes)) ** rng.uniform(0.5, 4.0)
    if rng.random() < 0.5:
        raw = raw / raw.sum(axis=1, keepdims=True)
    scores = np.round(raw, int(rng.integers(1, 4))).astype(np.float32 if rng.random() < 0.5 else np.float64)
    if kind == "multilabel":
        targets = (rng.random((n, classes)) < rng.uniform(0.05, 0.5)).astype(np.int64)
        targets[:, rng.random(classes) < 0.2] = 0                       # classes absent from the targets
        if not targets.any():
            targets[0, 0] = 1
        return Case(kind, scores, targets)
    used = np.flatnonzero(rng.random(classes) < 0.75) if kind == "multiclass" else np.arange(2)
    if used.size < 2:
        used = np.arange(2)
    targets = rng.choice(used, size=n)
    if kind == "binary" and np.unique(targets).size < 2:
        targets[:2] = [0, 1]                                              # ROC-AUC needs both kinds
    return Case(kind, scores, targets.astype(np.int64))


def toolkit_metrics(case: Case) -> dict[str, float]:
    """The toolkit's numbers for `case`, from `vision-evaluation` (and scikit-learn for ROC-AUC, as
    the toolkit's `metric.roc_auc` does)."""
    sm = require("sklearn.metrics", "the agreement check against scikit-learn")
    import vision_evaluation.evaluators as v_eval

    def report(evaluator, key=None):
        evaluator.add_predictions(case.scores, case.targets)
        values = evaluator.get_report()
        return float(values[key or evaluator._get_id()])

    out = {"map_11point": report(v_eval.MeanAveragePrecisionNPointsEvaluator(11)),
           "mean_average_precision": report(v_eval.AveragePrecisionEvaluator())}
    if case.kind == "multilabel":
        if np.all((case.targets.sum(0) > 0) & (case.targets.sum(0) < len(case.targets))):
            out["roc_auc"] = float(sm.roc_auc_score(case.targets, case.scores))
        return out
    out["acc1"] = report(v_eval.TopKAccuracyEvaluator(1), "accuracy_top1")
    if case.scores.shape[1] >= 5:
        out["acc5"] = report(v_eval.TopKAccuracyEvaluator(5), "accuracy_top5")
    out["mean_per_class_recall"] = report(v_eval.BalancedAccuracyScoreEvaluator())
    if case.kind == "binary":
        out["roc_auc"] = float(sm.roc_auc_score(case.targets, case.scores[:, 1]))
    return out


def our_metrics(case: Case) -> dict[str, float]:
    if case.kind == "multilabel":
        labels = [tuple(np.flatnonzero(row)) for row in case.targets]
    else:
        labels = [(int(t),) for t in case.targets]
    return metrics.compute_metrics(case.scores, labels, case.scores.shape[1], case.kind == "multilabel")


def max_differences(trials: int, seed: int = 0) -> dict[str, tuple[float, int]]:
    """metric -> (largest |ours - toolkit|, number of comparisons) over `trials` cases of each kind."""
    rng = np.random.default_rng(seed)
    worst: dict[str, tuple[float, int]] = {}
    for _ in range(trials):
        for kind in ("binary", "multiclass", "multilabel"):
            case = random_case(rng, kind)
            ours = our_metrics(case)
            for key, reference in toolkit_metrics(case).items():
                diff, count = worst.get(key, (0.0, 0))
                worst[key] = (max(diff, abs(ours[key] - reference)), count + 1)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmdistill.eval.elevater.agreement",
                                     description="Largest difference, per metric, between this harness's "
                                                 "metrics and the ELEVATER toolkit's evaluators.")
    parser.add_argument("--trials", type=int, default=200, help="random cases of each kind (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    import vision_evaluation  # noqa: F401 - fail early with the import error if it is missing

    for key, (diff, count) in sorted(max_differences(args.trials, args.seed).items()):
        print(f"{key:<24} max |ours - toolkit| = {diff:.3e}  over {count} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
