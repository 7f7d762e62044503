"""Segmentation: threshold, minimum lesion size (3D connected components) and the lesion table.

Works on the anomaly map on the input's grid, so voxel counts and volumes are those the
user sees in Slicer. Centroids are in RAS, Slicer's world coordinates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# 26-connectivity: voxels touching by a corner belong to the same lesion, as in Slicer's Islands effect.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Lesion:
    id: int
    voxels: int
    volume_ml: float
    max_score: float
    mean_score: float
    centroid_ras: tuple[float, float, float]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Segmentation:
    labels: np.ndarray  # (z, y, x) int32: 0 background, lesion ids from 1 (largest first)
    lesions: list[Lesion]
    threshold: float
    min_lesion_mm3: float

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0


def voxel_volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def segment_anomalies(anomaly_map: sitk.Image, threshold: float, min_lesion_mm3: float = 0.0) -> Segmentation:
    """Voxels with score > ``threshold`` grouped into lesions of at least ``min_lesion_mm3``."""
    scores = sitk.GetArrayViewFromImage(anomaly_map)
    voxel_mm3 = voxel_volume_mm3(anomaly_map)
    components, count = ndimage.label(scores > threshold, structure=CONNECTIVITY)
    if count == 0:
        return Segmentation(np.zeros(scores.shape, np.int32), [], threshold, min_lesion_mm3)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.flatnonzero(sizes * voxel_mm3 >= max(min_lesion_mm3, 1e-9))
    keep = keep[np.argsort(-sizes[keep], kind="stable")]  # largest lesion gets id 1
    relabel = np.zeros(count + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = relabel[components]
    lesions = _lesion_table(labels, scores, anomaly_map, len(keep), voxel_mm3)
    return Segmentation(labels, lesions, threshold, min_lesion_mm3)


def _lesion_table(labels: np.ndarray, scores: np.ndarray, image: sitk.Image, count: int,
                  voxel_mm3: float) -> list[Lesion]:
    """Per-lesion statistics over the lesion voxels only (not the whole volume), so the table
    costs little more than the thresholding when lesions are small."""
    if count == 0:
        return []
    flat = np.flatnonzero(labels)
    ids, values = labels.ravel()[flat], scores.ravel()[flat].astype(np.float64)
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    means = np.bincount(ids, weights=values, minlength=count + 1)[1:] / sizes
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, ids, values)
    zyx = np.unravel_index(flat, labels.shape)
    centres = np.stack([np.bincount(ids, weights=axis, minlength=count + 1)[1:] / sizes for axis in zyx], axis=1)
    lesions = []
    for index, (size, mean, peak, (z, y, x)) in enumerate(zip(sizes, means, maxima[1:], centres), start=1):
        lps = image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        lesions.append(Lesion(
            id=index, voxels=int(size), volume_ml=round(float(size) * voxel_mm3 / 1000.0, 4),
            max_score=round(float(peak), 5), mean_score=round(float(mean), 5),
            centroid_ras=(round(-lps[0], 2), round(-lps[1], 2), round(lps[2], 2)),
        ))
    return lesions
