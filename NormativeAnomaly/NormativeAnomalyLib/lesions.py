"""Segmentation: threshold, minimum lesion size (3D connected components) and the lesion table.

Works on the anomaly map on the input's grid, so voxel counts and volumes are those the
user sees in Slicer. Centroids are in RAS, Slicer's world coordinates.

``LesionSegmenter`` is the interactive form (Slicer and web sliders): it labels only the
bounding box of the voxels above the threshold and keeps the last labelling, so a
minimum-size change or a rejected lesion costs a relabel, not a new connected-components
pass. ``segment_anomalies`` is the one-shot form; both give the same result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# 26-connectivity: voxels touching by a corner belong to the same lesion, as in Slicer's Islands effect.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Lesion:
    id: int
    voxels: int
    volume_ml: float
    max_score: float
    mean_score: float
    centroid_ras: tuple[float, float, float]
    peak_ijk: tuple[int, int, int]  # voxel of the highest score: identifies the lesion across thresholds
    rejected: bool = False  # set aside by the user: listed, but not in the mask

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Segmentation:
    """Lesion labels inside ``box`` (the rest of the volume is background), and the table."""

    box_labels: np.ndarray  # int32 within ``box``: 0 background, lesion ids from 1 (largest first)
    box: Box
    shape: tuple[int, int, int]  # (z, y, x) of the whole volume
    lesions: list[Lesion]
    threshold: float
    min_lesion_mm3: float
    _full: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        """Lesion ids on the whole grid, (z, y, x) int32; rejected lesions included."""
        if self._full is None:
            self._full = np.zeros(self.shape, np.int32)
            self._full[self.box] = self.box_labels
        return self._full

    def box_mask(self) -> np.ndarray:
        """Kept (not rejected) lesion voxels within ``box``, uint8 0/1."""
        rejected = [lesion.id for lesion in self.lesions if lesion.rejected]
        mask = self.box_labels > 0
        if rejected:
            mask &= ~np.isin(self.box_labels, rejected)
        return mask.view(np.uint8)

    @property
    def mask(self) -> np.ndarray:
        """Kept lesion voxels on the whole grid, (z, y, x) bool."""
        full = np.zeros(self.shape, bool)
        full[self.box] = self.box_mask().view(bool)
        return full

    @property
    def kept(self) -> list[Lesion]:
        return [lesion for lesion in self.lesions if not lesion.rejected]


def voxel_volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def bounding_box(mask: np.ndarray) -> Box | None:
    """Smallest box holding every true voxel; None when there is none."""
    bounds = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        bounds.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(bounds)


class LesionSegmenter:
    """Threshold + minimum size + rejections on one anomaly map, fast enough for a slider."""

    def __init__(self, anomaly_map: sitk.Image) -> None:
        self.image = anomaly_map
        self.scores = sitk.GetArrayViewFromImage(anomaly_map)
        self.voxel_mm3 = voxel_volume_mm3(anomaly_map)
        # Scores are zero outside the scoring mask: positive thresholds only look inside this box.
        self._positive_box = bounding_box(self.scores > 0)
        self._labelled: tuple[float, Box | None, np.ndarray, np.ndarray] | None = None

    def segment(self, threshold: float, min_lesion_mm3: float = 0.0,
                rejected_peaks: Iterable[tuple[int, int, int]] = ()) -> Segmentation:
        """Lesions of at least ``min_lesion_mm3`` among voxels with score > ``threshold``.

        A lesion holding one of ``rejected_peaks`` (i, j, k voxels, usually the peak of a
        lesion the user rejected) is marked rejected: kept in the table, left out of the mask.
        """
        box, components, sizes = self._components(float(threshold))
        shape = self.scores.shape
        if box is None:
            return Segmentation(np.zeros((0, 0, 0), np.int32), (slice(0, 0),) * 3, shape, [], threshold,
                                min_lesion_mm3)
        keep = np.flatnonzero(sizes * self.voxel_mm3 >= max(min_lesion_mm3, 1e-9))
        keep = keep[keep > 0]
        keep = keep[np.argsort(-sizes[keep], kind="stable")]  # largest lesion gets id 1
        relabel = np.zeros(len(sizes), np.int32)
        relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
        box_labels = relabel[components]
        rejected_ids = set()
        for i, j, k in rejected_peaks:
            z, y, x = k - box[0].start, j - box[1].start, i - box[2].start
            if all(0 <= v < n for v, n in zip((z, y, x), box_labels.shape)) and box_labels[z, y, x] > 0:
                rejected_ids.add(int(box_labels[z, y, x]))
        lesions = _lesion_table(box_labels, box, self.scores[box], self.image, len(keep), self.voxel_mm3,
                                rejected_ids)
        return Segmentation(box_labels, box, shape, lesions, threshold, min_lesion_mm3)

    def _components(self, threshold: float) -> tuple[Box | None, np.ndarray, np.ndarray]:
        """(box, component labels in it, component sizes) for a threshold; the last one is cached."""
        if self._labelled is not None and self._labelled[0] == threshold:
            return self._labelled[1:]
        outer = self._positive_box if threshold >= 0 else tuple(slice(0, n) for n in self.scores.shape)
        box, components, sizes = None, np.zeros((0, 0, 0), np.int32), np.zeros(1, np.int64)
        if outer is not None:
            above = self.scores[outer] > threshold
            inner = bounding_box(above)
            if inner is not None:
                box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))
                components, count = ndimage.label(above[inner], structure=CONNECTIVITY)
                sizes = np.bincount(components.ravel(), minlength=count + 1)
        self._labelled = (threshold, box, components, sizes)
        return box, components, sizes


def segment_anomalies(anomaly_map: sitk.Image, threshold: float, min_lesion_mm3: float = 0.0) -> Segmentation:
    """Voxels with score > ``threshold`` grouped into lesions of at least ``min_lesion_mm3``."""
    return LesionSegmenter(anomaly_map).segment(threshold, min_lesion_mm3)


def _lesion_table(labels: np.ndarray, box: Box, scores: np.ndarray, image: sitk.Image, count: int,
                  voxel_mm3: float, rejected_ids: set[int]) -> list[Lesion]:
    """Per-lesion statistics over the lesion voxels only (not the whole volume), so the table
    costs little more than the thresholding when lesions are small."""
    if count == 0:
        return []
    flat = np.flatnonzero(labels)
    ids, values = labels.ravel()[flat], scores.ravel()[flat].astype(np.float64)
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    means = np.bincount(ids, weights=values, minlength=count + 1)[1:] / sizes
    # Peak voxel per lesion (the first one in memory order among ties): sort by (id, -score), stably.
    order = np.lexsort((-values, ids))
    first = order[np.r_[0, np.flatnonzero(np.diff(ids[order])) + 1]]
    peaks_zyx = np.stack(np.unravel_index(flat[first], labels.shape), axis=1) + [s.start for s in box]
    zyx = np.unravel_index(flat, labels.shape)
    centres = np.stack([np.bincount(ids, weights=axis, minlength=count + 1)[1:] / sizes for axis in zyx], axis=1)
    centres += [s.start for s in box]
    lesions = []
    for index in range(count):
        z, y, x = centres[index]
        lps = image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        pz, py, px = (int(v) for v in peaks_zyx[index])
        lesions.append(Lesion(
            id=index + 1, voxels=int(sizes[index]), volume_ml=round(float(sizes[index]) * voxel_mm3 / 1000.0, 4),
            max_score=significant(values[first[index]]), mean_score=significant(means[index]),
            centroid_ras=(round(-lps[0], 2), round(-lps[1], 2), round(lps[2], 2)), peak_ijk=(px, py, pz),
            rejected=index + 1 in rejected_ids,
        ))
    return lesions


def significant(value: float, digits: int = 6) -> float:
    """Rounded to ``digits`` significant digits: what a saved MRML scene keeps of a table cell or a
    display threshold, whatever the map's units (a residual near 0.1, a deviation near 10)."""
    return float(f"{float(value):.{digits}g}")
