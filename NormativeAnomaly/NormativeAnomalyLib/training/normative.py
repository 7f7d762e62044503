"""Fitting location-aware scoring: per-voxel healthy residual statistics and their calibration.

Fitting works on per-scan smoothed sums, so that statistics without some scans (cross-fitting the
calibration, leave-cases-out evaluation) cost a sum, not another pass of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..normative import NormativeStatistics, deviation_map
from ..scoring import Calibration
from .scans import LESION_MARGIN_MM, healthy_region, prepare_scan

# Spread floor, in model intensity units (1 = the scan's 1st-99th percentile range): keeps a
# location where healthy residuals barely vary from turning noise into huge deviations.
MIN_SPREAD = 0.01
# Weight of the global mean and spread at every voxel, in scans: a voxel covered by one scan
# is half global, one covered by all of them is mostly its own.
PRIOR_SCANS = 1.0


@dataclass(frozen=True)
class ScanSums:
    """One healthy scan's contribution: its residual, where it counts, and the smoothed sums."""

    case: str
    score: np.ndarray  # the residual map before location scaling (scoring.residual_map)
    scored: np.ndarray  # where the anomaly map is defined (the eroded brain)
    healthy: np.ndarray  # the scored voxels away from lesions: what the statistics and calibration use
    count: np.ndarray  # smoothed sums of 1, r and r^2 over the healthy voxels
    first: np.ndarray
    second: np.ndarray

    @classmethod
    def of(cls, case: str, score: np.ndarray, scored: np.ndarray, healthy: np.ndarray,
           smoothing_voxels: float | list[float]) -> "ScanSums":
        weight = healthy.astype(np.float64)
        smooth = lambda values: ndimage.gaussian_filter(values, smoothing_voxels)  # noqa: E731
        return cls(case, score.astype(np.float32), scored.astype(bool), healthy.astype(bool), smooth(weight),
                   smooth(weight * score), smooth(weight * score.astype(np.float64) ** 2))


def fit_statistics(scans: list[ScanSums]) -> NormativeStatistics:
    """Per-voxel mean and spread from the scans' sums, shrunk towards the global figures."""
    if not scans:
        raise ValueError("no healthy scans to fit normative statistics on")
    count = sum(s.count for s in scans)
    first = sum(s.first for s in scans)
    second = sum(s.second for s in scans)
    values = np.concatenate([s.score[s.healthy] for s in scans]).astype(np.float64)
    if values.size == 0:
        raise ValueError("the healthy scans have no healthy voxels")
    global_mean, global_second = float(values.mean()), float((values ** 2).mean())
    # A scan's smoothed weight is about 1 wherever it has healthy tissue: the prior counts as PRIOR_SCANS scans.
    mean = (first + PRIOR_SCANS * global_mean) / (count + PRIOR_SCANS)
    second_moment = (second + PRIOR_SCANS * global_second) / (count + PRIOR_SCANS)
    spread = np.sqrt(np.maximum(second_moment - mean ** 2, 0.0)) + MIN_SPREAD
    return NormativeStatistics(mean.astype(np.float32), spread.astype(np.float32))


def cross_fitted_calibration(scans: list[ScanSums], scan_scaled: bool) -> Calibration:
    """Thresholds from each scan's healthy voxels scored with statistics fitted without it.

    Scoring the scans the statistics were fitted on would understate healthy deviations (each
    scan pulls the mean towards itself), and the thresholds would flag too much on new scans.
    """
    if len(scans) < 2:
        raise ValueError("cross-fitting the calibration needs at least two healthy scans")
    healthy_scores = []
    for index, scan in enumerate(scans):
        statistics = fit_statistics(scans[:index] + scans[index + 1:])
        healthy_scores.append(deviation_map(scan.score, scan.scored, statistics, scan_scaled)[scan.healthy])
    return Calibration.from_healthy_scores(np.concatenate(healthy_scores))


def scan_sums(package, image, lesion_on_input, case: str, smoothing_mm: float,
              lesion_margin_mm: float = LESION_MARGIN_MM, registration=None, device: str = "cpu",
              skull_stripped: bool | None = None):
    """(ScanSums, Registration) of one scan through the package's own stages up to the residual.

    ``lesion_on_input``: a label image on the scan's grid (voxels > 0 are lesion), or None for a
    healthy scan. ``registration``: reuse one computed before. ``skull_stripped``: as the
    pipeline's option (None: detected), so that the brain scored is the one a run scores."""
    from ..device import select_device
    from ..inference import run_on_model_input
    from ..scoring import residual_map, scoring_mask

    card, template = package.card, package.template
    model_input, lesion, registration = prepare_scan(image, template, card["preprocessing"], lesion_on_input,
                                                     skull_stripped, registration)
    inference = run_on_model_input(package, model_input, select_device(device))
    spacing_zyx = tuple(reversed(template.image.GetSpacing()))
    score = residual_map(model_input.image, inference.reconstruction, card["scoring"])
    scored = scoring_mask(model_input.brain_mask, spacing_zyx, card["scoring"]["mask_erosion_mm"])
    healthy = healthy_region(scored, lesion, spacing_zyx, lesion_margin_mm)
    sigma_voxels = [smoothing_mm / s for s in spacing_zyx]
    return ScanSums.of(case, score, scored, healthy, sigma_voxels), registration


def leave_out(package, scans: list[ScanSums], cases: set[str]):
    """The package with statistics and calibration fitted without ``cases``: for evaluating it on them."""
    import dataclasses

    kept = [scan for scan in scans if scan.case not in cases]
    scan_scaled = package.card["scoring"].get("scan_normalisation", "none") == "median"
    calibration = cross_fitted_calibration(kept, scan_scaled)
    card = {**package.card, "calibration": {**package.card["calibration"], "fpr": list(calibration.fpr),
                                            "threshold": list(calibration.threshold)}}
    return dataclasses.replace(package, card=card, normative=fit_statistics(kept))


def fold_networks(package, folds: list) -> list:
    """The package, then each fold of it (the same model trained on other cases), all without
    location statistics and all preprocessed, scored and calibrated as the package is: a fold
    lends only its network. With ``evaluation.package_for`` it gives, for each case, a network
    that did not learn from it: residuals for statistics that hold for scans no network saw."""
    import dataclasses

    shared = {key: package.card[key] for key in ("preprocessing", "scoring", "calibration")}
    return [dataclasses.replace(package, normative=None)] + [
        dataclasses.replace(fold, card={**fold.card, **shared}, normative=None) for fold in folds]
