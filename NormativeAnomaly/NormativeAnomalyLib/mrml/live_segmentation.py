"""Threshold and minimum-size sliders -> the "Anomaly" segment and the lesion table, live.

Each update recomputes the whole 3D segmentation (not only the visible slice) from the
anomaly map with the core's ``LesionSegmenter`` (the CLI's code, so Slicer, web and CLI
agree voxel for voxel), and writes only the bounding box of the lesions into the segment.
"""

from __future__ import annotations

import hashlib
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


class SegmentationEditedError(SegmentationFrozenError):
    """The segment was edited outside the module (e.g. in the Segment Editor): it is frozen now."""


class LiveSegmentation:
    def __init__(self, nodes: ResultNodes, new_result: bool = False) -> None:
        """``new_result``: the segment was just created empty (no edits to look for yet)."""
        self.nodes = nodes
        self.segmenter = LesionSegmenter(image_from_volume_node(nodes.anomaly_map))
        self.current: Segmentation | None = None
        # What the segment held after the module last wrote it: an edit made anywhere else (the
        # Segment Editor opened directly) is told apart from the module's own writes by content.
        self._written: str | None = self._segment_fingerprint() if new_result else None
        self._written_stamp: tuple | None = None  # the labelmap as last written: unchanged means not edited

    @property
    def fpr(self) -> float:
        """Healthy false-positive rate of the current threshold (from the model's calibration)."""
        return self.nodes.calibration.fpr_for_threshold(self.nodes.threshold)

    def threshold_for_fpr(self, fpr: float) -> float:
        return self.nodes.calibration.threshold_for_fpr(fpr)

    def update(self, threshold: float | None = None, min_lesion_mm3: float | None = None) -> Segmentation:
        """Segment at the given (or saved) settings; write the segment and the table; save the settings.

        A segment edited by hand since the module wrote it is never overwritten: it is frozen (as by
        the "Edit in Segment Editor" hand-over) and SegmentationEditedError says so; ``reset`` discards
        the edits."""
        if self.nodes.frozen:
            raise SegmentationFrozenError(
                f"{self.nodes.segmentation.GetName()!r} was opened for manual editing; thresholds no longer "
                "change it (reset it to the thresholded map to use the sliders again)")
        if self.edited_outside():
            self.freeze()
            raise SegmentationEditedError(
                f"{self.nodes.segmentation.GetName()!r} was edited by hand, so the sliders no longer change it "
                "(your edits are kept; reset it to the thresholded map to use the sliders again)")
        threshold = self.nodes.threshold if threshold is None else float(threshold)
        min_size = self.nodes.min_lesion_mm3 if min_lesion_mm3 is None else float(min_lesion_mm3)
        if min_size < 0:
            raise NormativeAnomalyError("the minimum lesion size must not be negative")
        segmentation = self.segmenter.segment(threshold, min_size, self.nodes.rejected_peaks)
        self._write_segment(segmentation)
        self._written = _fingerprint(segmentation.box_mask(), segmentation.box, self._ijk_to_ras())
        self._written_stamp = self._labelmap_stamp()
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
        self._written = self._segment_fingerprint()  # the edits are to be replaced, not kept
        return self.update()

    def edited_outside(self) -> bool:
        """Whether the segment differs from what the module last wrote into it. For a result the
        module has not written yet (a reopened scene), from what its saved settings give."""
        if self._written is None:
            expected = self.segmenter.segment(self.nodes.threshold, self.nodes.min_lesion_mm3,
                                              self.nodes.rejected_peaks)
            self._written = _fingerprint(expected.box_mask(), expected.box, self._ijk_to_ras())
        if self._written_stamp is not None and self._labelmap_stamp() == self._written_stamp:
            return False  # not touched since the module wrote it: a slider step skips the hashing
        return self._segment_fingerprint() != self._written

    def _labelmap(self):
        segment = self.nodes.segmentation.GetSegmentation().GetSegment(SEGMENT_ID)
        return segment, segment.GetRepresentation("Binary labelmap") if segment is not None else None

    def _labelmap_stamp(self) -> tuple | None:
        """The segment's labelmap object and its modification times: any edit (the Segment Editor's
        included) replaces the object or marks it modified."""
        _segment, labelmap = self._labelmap()
        if labelmap is None:
            return None
        scalars = labelmap.GetPointData().GetScalars()
        return labelmap.__this__, labelmap.GetMTime(), scalars.GetMTime() if scalars is not None else None

    def _segment_fingerprint(self) -> str:
        segment, labelmap = self._labelmap()
        scalars = labelmap.GetPointData().GetScalars() if labelmap is not None else None
        if scalars is None:
            return _fingerprint(np.zeros((0, 0, 0), bool), (slice(0, 0),) * 3, self._ijk_to_ras())
        i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
        values = numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        return _fingerprint(values == segment.GetLabelValue(), (slice(k0, k1 + 1), slice(j0, j1 + 1),
                                                                slice(i0, i1 + 1)), _matrix_values(matrix))

    def _ijk_to_ras(self) -> tuple[float, ...]:
        matrix = vtk.vtkMatrix4x4()
        self.nodes.input_volume.GetIJKToRASMatrix(matrix)
        return _matrix_values(matrix)

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


def _matrix_values(matrix) -> tuple[float, ...]:
    return tuple(round(matrix.GetElement(row, column), 6) for row in range(3) for column in range(4))


def _fingerprint(mask: np.ndarray, box, ijk_to_ras: tuple[float, ...]) -> str:
    """The set voxels as (k, j, i) positions on the input's grid, and that grid: equal for equal
    content whatever extent the labelmap was stored with."""
    offset = np.array([part.start for part in box], np.int64)
    positions = np.argwhere(mask) + offset
    digest = hashlib.sha1(np.ascontiguousarray(positions, np.int64).tobytes())
    digest.update(repr(ijk_to_ras).encode())
    return digest.hexdigest()


def _inside(peak_ijk, lesion_id: int, labels: np.ndarray, box) -> bool:
    i, j, k = peak_ijk
    z, y, x = k - box[0].start, j - box[1].start, i - box[2].start
    return all(0 <= v < n for v, n in zip((z, y, x), labels.shape)) and labels[z, y, x] == lesion_id
