"""Threshold and minimum-size sliders -> the "Anomaly" segment and the lesion table, live.

Each update recomputes the whole 3D segmentation (not only the visible slice) from the
anomaly map with the core's ``LesionSegmenter`` (the CLI's code, so Slicer, web and CLI
agree voxel for voxel), and writes only the bounding box of the lesions into the segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from ..errors import NormativeAnomalyError
from ..lesions import LesionSegmenter, Segmentation
from .lesion_table import write_lesion_table
from .result_nodes import SEGMENT_ID, ResultNodes
from .volumes import image_from_volume_node


@dataclass(frozen=True)
class ThresholdRange:
    """What a threshold slider offers for a result (the Slicer panel's and the web app's)."""
    maximum: float
    step: float
    decimals: int


def threshold_range(nodes: ResultNodes) -> ThresholdRange:
    """0 to 1.5 x the threshold at the smallest calibrated false-positive rate (or the map's maximum),
    never below the saved threshold (a slider would clamp it), in about 1000 steps."""
    top = nodes.calibration.threshold[0] * 1.5
    if not top > 0:
        top = nodes.anomaly_map.GetImageData().GetScalarRange()[1]
    top = max(top, nodes.threshold, 1e-6)
    step = 10.0 ** math.floor(math.log10(top / 1000.0))
    return ThresholdRange(top, step, max(0, -math.floor(math.log10(step))))


class SegmentationFrozenError(NormativeAnomalyError):
    """The segment was handed over for manual editing; a slider would overwrite those edits."""


class LiveSegmentation:
    def __init__(self, nodes: ResultNodes) -> None:
        self.nodes = nodes
        self.segmenter = LesionSegmenter(image_from_volume_node(nodes.anomaly_map))
        self.current: Segmentation | None = None

    @property
    def fpr(self) -> float:
        """Healthy false-positive rate of the current threshold (from the model's calibration)."""
        return self.nodes.calibration.fpr_for_threshold(self.nodes.threshold)

    def threshold_for_fpr(self, fpr: float) -> float:
        return self.nodes.calibration.threshold_for_fpr(fpr)

    def update(self, threshold: float | None = None, min_lesion_mm3: float | None = None) -> Segmentation:
        """Segment at the given (or saved) settings; write the segment and the table; save the settings."""
        if self.nodes.frozen:
            raise SegmentationFrozenError(
                f"{self.nodes.segmentation.GetName()!r} was opened for manual editing; thresholds no longer "
                "change it (reset it to the thresholded map to use the sliders again)")
        threshold = self.nodes.threshold if threshold is None else float(threshold)
        min_size = self.nodes.min_lesion_mm3 if min_lesion_mm3 is None else float(min_lesion_mm3)
        if min_size < 0:
            raise NormativeAnomalyError("the minimum lesion size must not be negative")
        segmentation = self.segmenter.segment(threshold, min_size, self.nodes.rejected_peaks)
        self._write_segment(segmentation)
        write_lesion_table(self.nodes.lesion_table, segmentation)
        if threshold != self.nodes.threshold:
            self.nodes.threshold = threshold
        if min_size != self.nodes.min_lesion_mm3:
            self.nodes.min_lesion_mm3 = min_size
        self.current = segmentation
        return segmentation

    def set_rejected(self, lesion_id: int, rejected: bool = True) -> Segmentation:
        """Reject a lesion (it stays in the table, leaves the segment) or restore it."""
        lesion = self._lesion(lesion_id)
        labels, box = self.current.box_labels, self.current.box
        # Drop every rejection seed inside this lesion, then add its peak back if it is to be rejected.
        seeds = [p for p in self.nodes.rejected_peaks if not _inside(p, lesion_id, labels, box)]
        self.nodes.rejected_peaks = seeds + ([lesion.peak_ijk] if rejected else [])
        return self.update()

    def freeze(self) -> None:
        """Hand the segment over to manual editing: the sliders stop overwriting it."""
        self.nodes.frozen = True

    def reset(self) -> Segmentation:
        """Discard manual edits: back to the thresholded map at the saved settings."""
        self.nodes.frozen = False
        return self.update()

    def _lesion(self, lesion_id: int):
        if self.current is None:
            self.update()
        for lesion in self.current.lesions:
            if lesion.id == lesion_id:
                return lesion
        raise NormativeAnomalyError(f"there is no lesion {lesion_id} at the current threshold")

    def _write_segment(self, segmentation: Segmentation) -> None:
        """Replace the segment's labelmap by the kept lesions (the lesions' box only: fast)."""
        box = segmentation.box
        mask = segmentation.box_mask()
        if mask.size == 0:
            box, mask = (slice(0, 1),) * 3, np.zeros((1, 1, 1), np.uint8)
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetExtent(box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1, box[0].start,
                           box[0].stop - 1)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask).ravel(), deep=False,
                                             array_type=vtk.VTK_UNSIGNED_CHAR)
        labelmap.GetPointData().SetScalars(scalars)
        ijk_to_ras = vtk.vtkMatrix4x4()
        self.nodes.input_volume.GetIJKToRASMatrix(ijk_to_ras)
        labelmap.SetImageToWorldMatrix(ijk_to_ras)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, self.nodes.segmentation, SEGMENT_ID,
                slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise RuntimeError(f"could not update segment {SEGMENT_ID!r} of {self.nodes.segmentation.GetName()!r}")


def _inside(peak_ijk, lesion_id: int, labels: np.ndarray, box) -> bool:
    i, j, k = peak_ijk
    z, y, x = k - box[0].start, j - box[1].start, i - box[2].start
    return all(0 <= v < n for v, n in zip((z, y, x), labels.shape)) and labels[z, y, x] == lesion_id
