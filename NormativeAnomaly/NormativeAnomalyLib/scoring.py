"""Scoring: the residual anomaly map, and thresholds stated as healthy false-positive rates.

Each model package carries a calibration table (healthy voxel false-positive rate ->
anomaly-map threshold) measured on held-out healthy scans with the same scoring, so that
"1% of healthy brain voxels flagged" means the same thing for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage

from .normative import NormativeStatistics, deviation_map

# Healthy false-positive rates at which calibration thresholds are stored (log-spaced).
CALIBRATION_FPRS = tuple(float(f) for f in np.logspace(-5, np.log10(0.5), 41))
# Gaussian windows (voxels, sigma) of the structural dissimilarity, averaged: several scales, as
# multi-scale SSIM, so that a lesion's texture and its extent both count.
SSIM_SIGMAS = (1.0, 2.0, 4.0)
# SSIM's stabilising constants for intensities of range 1 (model units: brain percentiles 1-99 -> 0-1).
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


@dataclass(frozen=True)
class Calibration:
    fpr: tuple[float, ...]  # rising
    threshold: tuple[float, ...]  # the matching thresholds, non-rising

    @classmethod
    def from_healthy_scores(cls, scores: np.ndarray, fprs: tuple[float, ...] = CALIBRATION_FPRS) -> "Calibration":
        """Thresholds exceeded by a fraction ``fpr`` of healthy in-brain voxel scores."""
        thresholds = np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - np.asarray(fprs))
        return cls(tuple(fprs), tuple(float(t) for t in np.minimum.accumulate(thresholds)))

    def threshold_for_fpr(self, fpr: float) -> float:
        """Interpolated in log(fpr); clamped to the calibrated range."""
        log_fpr = np.log(np.clip(fpr, self.fpr[0], self.fpr[-1]))
        return float(np.interp(log_fpr, np.log(self.fpr), self.threshold))

    def fpr_for_threshold(self, threshold: float) -> float:
        """Healthy false-positive rate of a threshold (the inverse of :meth:`threshold_for_fpr`)."""
        thresholds = np.asarray(self.threshold)[::-1]  # rising, for np.interp
        log_fprs = np.log(np.asarray(self.fpr))[::-1]
        return float(np.exp(np.interp(threshold, thresholds, log_fprs)))


def residual(image: np.ndarray, reconstruction: np.ndarray | None, mode: str) -> np.ndarray:
    """Voxel-wise residual; with no reconstruction (intensity baseline) the intensity is the score."""
    difference = image if reconstruction is None else image - reconstruction
    if mode == "absolute":
        return np.abs(difference)
    if mode == "positive":  # hyperintense lesions only
        return np.maximum(difference, 0.0)
    if mode == "negative":  # hypointense lesions only
        return np.maximum(-difference, 0.0)
    raise ValueError(f"unknown residual mode {mode!r}")


def scoring_mask(brain_mask: np.ndarray, spacing_zyx: tuple[float, float, float], erosion_mm: float) -> np.ndarray:
    """The brain mask eroded by ``erosion_mm`` (residuals at the brain's edge are mostly misregistration)."""
    if erosion_mm <= 0:
        return brain_mask.astype(bool)
    distance = ndimage.distance_transform_edt(brain_mask, sampling=spacing_zyx)
    return distance > erosion_mm


def structural_dissimilarity(image: np.ndarray, reconstruction: np.ndarray,
                             sigmas: tuple[float, ...] = SSIM_SIGMAS) -> np.ndarray:
    """1 - SSIM between image and reconstruction in Gaussian windows, averaged over ``sigmas``.

    Where the intensity residual sees only how far a voxel is from its reconstruction, SSIM also
    sees texture and local contrast the reconstruction lacks (a lesion's rim, a mass effect)."""
    x, y = image.astype(np.float64), reconstruction.astype(np.float64)
    total = np.zeros(x.shape)
    for sigma in sigmas:
        blur = partial(ndimage.gaussian_filter, sigma=sigma)
        mean_x, mean_y = blur(x), blur(y)
        var_x, var_y = blur(x * x) - mean_x**2, blur(y * y) - mean_y**2
        covariance = blur(x * y) - mean_x * mean_y
        ssim = ((2 * mean_x * mean_y + SSIM_C1) * (2 * covariance + SSIM_C2)
                / ((mean_x**2 + mean_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))
        total += 1.0 - ssim
    return (total / len(sigmas)).astype(np.float32)


def residual_map(image: np.ndarray, reconstruction: np.ndarray | None, settings: dict) -> np.ndarray:
    """The residual, median-filtered: what an anomaly map is made of (model-space arrays).

    ``input_weight`` adds the input's own intensity, signed as the residual is (bright for a
    positive residual, dark for a negative one): where lesions are brighter than any healthy
    tissue (FLAIR), the intensity is evidence the reconstruction may have half absorbed.
    ``ssim_weight`` adds the structural dissimilarity (``structural_dissimilarity``), for a signed
    residual only where the input, smoothed, departs from the reconstruction in the residual's direction."""
    score = residual(image, reconstruction, settings["residual"])
    weight = float(settings.get("input_weight", 0.0))
    if weight and reconstruction is not None:
        if settings["residual"] == "absolute":
            raise ValueError("input_weight needs a signed residual (positive or negative): it says which way "
                             "lesions go")
        score = score + weight * (image if settings["residual"] == "positive" else -image)
    ssim_weight = float(settings.get("ssim_weight", 0.0))
    if ssim_weight and reconstruction is not None:
        dissimilarity = structural_dissimilarity(image, reconstruction)
        if settings["residual"] != "absolute":
            departure = ndimage.gaussian_filter(image - reconstruction, 1.0)
            toward = departure > 0 if settings["residual"] == "positive" else departure < 0
            dissimilarity = np.where(toward, dissimilarity, 0.0)
        score = score + ssim_weight * dissimilarity
    if settings["median_filter_voxels"] > 1:
        score = ndimage.median_filter(score, size=settings["median_filter_voxels"])
    return score.astype(np.float32)


def anomaly_map(image: np.ndarray, reconstruction: np.ndarray | None, brain_mask: np.ndarray,
                spacing_zyx: tuple[float, float, float], settings: dict,
                normative: NormativeStatistics | None = None) -> np.ndarray:
    """Residual, median-filtered, zero outside the eroded brain mask (model-space arrays).

    With ``normative`` statistics (location-aware scoring) the map is the residual's deviation
    above healthy scans at each place, in healthy spreads.
    With ``scan_normalisation: "median"`` the map is divided by the scan's own median (residual,
    or absolute deviation): a scan that is noisier or less like the training data than the
    calibration scans then keeps the same healthy false-positive rate (lesions are too small to
    move the median).
    """
    score = residual_map(image, reconstruction, settings)
    mask = scoring_mask(brain_mask, spacing_zyx, settings["mask_erosion_mm"])
    scan_scaled = settings.get("scan_normalisation", "none") == "median"
    if normative is not None:
        return deviation_map(score, mask, normative, scan_scaled)
    if scan_scaled and mask.any():
        score = score / max(float(np.median(score[mask])), 1e-6)
    return np.where(mask, score, 0.0).astype(np.float32)
