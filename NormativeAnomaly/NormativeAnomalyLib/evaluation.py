"""Evaluation metrics for anomaly maps against lesion masks (voxel- and lesion-wise).

Voxel metrics pool every brain voxel of a set of cases, as the benchmarks do (Baur et al.
2021): AUROC, AUPRC (average precision), Dice at a given threshold, and the *best* Dice over
all thresholds, which needs the ground truth to choose its threshold and so is optimistic
(most papers report only it); it is reported separately and named so.

The procedure (``find_cases``, ``evaluate_model``) runs every case through the pipeline exactly
as ``normative-anomaly run`` does; scripts/evaluate.py and scripts/evaluate_brats.py report it.
"""

from __future__ import annotations

import csv
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .lesions import CONNECTIVITY
from .registration import register_to_template


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


# How a scan is re-acquired before it is scored, to measure other acquisitions on the same cases:
# thick axial slices (5 mm, each the mean of five 1 mm slices), or the same voxels stored in
# another orientation (sagittal slices first), as Slicer may load them.
ACQUISITIONS = {
    "as-is": None,
    "thick-5mm": lambda image: sitk.BinShrink(image, [1, 1, 5]),
    "sagittal-storage": lambda image: sitk.DICOMOrient(image, "ASL"),
}


# --- The procedure ---------------------------------------------------------------------------

PAIR_PATTERNS = [(r"(.+)_image\.nii\.gz$", "{}_mask.nii.gz"), (r"(.+)_t1\.nii\.gz$", "{}_seg.nii.gz"),
                 (r"(.+)_T1w\.nii\.gz$", "{}_label-L_mask.nii.gz")]


def find_cases(folder: Path) -> list[dict]:
    """A folder's cases: ``<case>_image.nii.gz`` with ``<case>_mask.nii.gz`` for lesion cases (no
    mask: a healthy scan), or BraTS- or ATLAS-style pairs; ``cases.csv`` (case, type) groups them."""
    types = {}
    if (folder / "cases.csv").is_file():
        with open(folder / "cases.csv") as stream:
            types = {row["case"]: row["type"] for row in csv.DictReader(stream)}
    cases = []
    for path in sorted(folder.iterdir()):
        for pattern, mask_name in PAIR_PATTERNS:
            match = re.match(pattern, path.name)
            if match:
                name = match.group(1)
                mask = folder / mask_name.format(name)
                kind = types.get(name, "lesion" if mask.is_file() else "healthy")
                cases.append({"case": name, "image": path, "mask": mask if mask.is_file() else None, "type": kind})
    return cases


def lesion_cases(folder: Path, limit: int | None = None) -> list[str]:
    """The names of a folder's cases that have a lesion label (``find_cases``), sorted; the first
    ``limit`` only, for a quick look."""
    cases = [entry["case"] for entry in find_cases(folder) if entry["mask"] is not None]
    return cases[:limit] if limit else cases


class Registrations:
    """Each case registered once per (template, kind) and reused by every model: the models are
    then compared on identical inputs, and the evaluation takes a fraction of the time."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str, str], tuple[object, float]] = {}

    def __call__(self, case: str, image: sitk.Image, package) -> tuple[object, float]:
        kind = package.card["preprocessing"]["registration"]
        key = (case, package.template.name, kind)
        if key not in self.cache:
            start = time.perf_counter()
            registration = register_to_template(image, package.template.image, kind)
            self.cache[key] = (registration, time.perf_counter() - start)
        return self.cache[key]


def evaluate_model(model: str, cases: list[dict], keep_maps: set[str], registrations: Registrations) -> dict:
    """Pooled voxel metrics per lesion type, mL flagged per healthy scan and seconds per volume of
    one model over ``cases`` (``find_cases``); the maps of the ``keep_maps`` cases for a figure."""
    from .models import resolve_model
    from .pipeline import RunOptions, detect_anomalies
    from .volume_io import read_volume

    package = resolve_model(model)
    pooled = defaultdict(lambda: {"scores": [], "truth": [], "predicted": [], "hit": 0, "lesions": 0})
    healthy, seconds, maps = {}, [], {}
    for case in cases:
        image = read_volume(case["image"])
        registration, registration_seconds = registrations(case["case"], image, package)
        start = time.perf_counter()
        # A research measure: every case is scored, even one under the alignment cut-off.
        options = RunOptions(device="cpu", registration=registration, accept_poor_alignment=True)
        result = detect_anomalies(image, package, options)
        # Seconds per volume as a user sees them: registration counted for every model.
        seconds.append(time.perf_counter() - start + registration_seconds)
        scores = sitk.GetArrayFromImage(result.anomaly_map)
        region = sitk.GetArrayViewFromImage(result.brain_mask) > 0
        predicted = result.segmentation.mask
        if case["case"] in keep_maps:
            maps[case["case"]] = (result.pseudo_healthy, result.anomaly_map, result.segmentation.threshold)
        if case["mask"] is None:
            healthy[case["case"]] = round(sum(l.volume_ml for l in result.segmentation.lesions), 3)
            continue
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case["mask"]))) > 0.5  # a label map: not read_volume
        region |= truth
        entry = pooled[case["type"]]
        entry["scores"].append(scores[region])
        entry["truth"].append(truth[region])
        entry["predicted"].append(predicted[region])
        hit, count = detected_lesions(predicted, truth)
        entry["hit"] += hit
        entry["lesions"] += count
        print(f"  {package.name} {case['case']}: Dice {dice(predicted, truth):.3f}, {seconds[-1]:.1f} s", flush=True)
    rows = {}
    for kind, entry in pooled.items():
        scores, truth = np.concatenate(entry["scores"]), np.concatenate(entry["truth"])
        rows[kind] = {"dice_calibrated": dice(np.concatenate(entry["predicted"]), truth),
                      "best_dice": best_dice(scores, truth)[0], "auprc": auprc(scores, truth),
                      "auroc": auroc(scores, truth), "detected": entry["hit"], "lesions": entry["lesions"],
                      "prevalence": float(truth.mean())}
    return {"model": package.name, "family": package.family, "types": rows, "healthy_flagged_ml": healthy,
            "seconds_per_volume": float(np.mean(seconds)), "threshold_fpr": package.card["scoring"]["default_fpr"],
            "maps": maps}
