"""Evaluation metrics for anomaly maps against lesion masks (voxel- and lesion-wise).

Voxel metrics pool every brain voxel of a set of cases, as the benchmarks do (Baur et al.
2021): AUROC, AUPRC (average precision), Dice at a given threshold, and the *best* Dice over
all thresholds, which needs the ground truth to choose its threshold and so is optimistic
(most papers report only it); it is reported separately and named so.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .lesions import CONNECTIVITY


def _sorted_counts(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with true and false positives at or above each."""
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order].astype(np.int64)
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(truth)[last_of_run]
    false_positives = (last_of_run + 1) - true_positives
    return scores[last_of_run], true_positives, false_positives


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    _, tp, fp = _sorted_counts(np.ravel(scores), np.ravel(truth).astype(bool))
    positives, negatives = tp[-1], fp[-1]
    if positives == 0 or negatives == 0:
        return float("nan")
    tpr = np.r_[0, tp] / positives
    fpr = np.r_[0, fp] / negatives
    return float(np.trapezoid(tpr, fpr))


def auprc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Average precision: sum over thresholds of precision times the recall gained."""
    _, tp, fp = _sorted_counts(np.ravel(scores), np.ravel(truth).astype(bool))
    if tp[-1] == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(precision * recall_gain))


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = predicted.sum() + truth.sum()
    return float(2 * np.logical_and(predicted, truth).sum() / total) if total else float("nan")


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(best Dice over all thresholds, that threshold): an upper bound, since it looks at the truth."""
    thresholds, tp, fp = _sorted_counts(np.ravel(scores), np.ravel(truth).astype(bool))
    if tp[-1] == 0:
        return float("nan"), float("nan")
    dices = 2 * tp / (tp + fp + tp[-1])
    best = int(np.argmax(dices))
    return float(dices[best]), float(thresholds[best])


def detected_lesions(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(true lesions touched by the prediction, true lesions), lesions as 26-connected components."""
    labels, count = ndimage.label(np.asarray(truth, bool), structure=CONNECTIVITY)
    if count == 0:
        return 0, 0
    hit = np.unique(labels[np.asarray(predicted, bool) & (labels > 0)])
    return int(len(hit)), int(count)


def trained_cases(package) -> list[str]:
    """The cases a package's network learnt healthy tissue from (its card's ``training.cases``)."""
    return list(package.card.get("training", {}).get("cases", []))


def package_for(case: str, packages: list):
    """The first of ``packages`` (a model, then its folds) whose network did not learn from
    ``case``: a model is never scored on a case it saw."""
    for package in packages:
        if case not in trained_cases(package):
            return package
    raise ValueError(f"{packages[0].name} learnt from {case} and none of its folds left it out")
