"""Patients' scans in model space, and which of their tissue counts as healthy.

A scan goes into model space as a run prepares it (a skull-stripped scan registered to the
template's brain and masked by its own), and its lesion label goes with it; healthy tissue is
what lies beyond a margin around the label. Training (``data``) and location statistics
(``normative``) learn from that tissue only.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..model_space import ModelSpaceInput, prepare_model_input, to_model_space
from ..registration import Registration, register_scan
from ..templates import Template

# A scan's lesion label lies beside it as <case><LESION_SUFFIX> (BraTS's naming).
LESION_SUFFIX = "_seg.nii.gz"
# Healthy tissue is taken this far from any labelled lesion (oedema and mass effect reach beyond labels).
LESION_MARGIN_MM = 10.0


def healthy_region(scored: np.ndarray, lesion: np.ndarray | None, spacing_zyx: tuple[float, float, float],
                   margin_mm: float = LESION_MARGIN_MM) -> np.ndarray:
    """The scored voxels farther than ``margin_mm`` from any lesion voxel."""
    if lesion is None or not lesion.any():
        return scored.astype(bool)
    return scored & (ndimage.distance_transform_edt(~lesion.astype(bool), sampling=spacing_zyx) > margin_mm)


def prepare_scan(image: sitk.Image, template: Template, preprocessing: dict, lesion: sitk.Image | None = None,
                 skull_stripped: bool | None = None, registration: Registration | None = None,
                 ) -> tuple[ModelSpaceInput, np.ndarray | None, Registration]:
    """A scan in model space as a run prepares it (``skull_stripped``: as the run option, None
    detects), and its lesion label (voxels > 0, on the scan's grid) mapped there too."""
    from ..pipeline import RunOptions, bias_correction, input_brain_mask

    brain_mask, mask_name, stripped = input_brain_mask(image, RunOptions(skull_stripped=skull_stripped))
    if registration is None:
        registration = register_scan(image, template, stripped, preprocessing["registration"])
    model_input = prepare_model_input(image, template, registration, preprocessing["normalisation"], brain_mask,
                                      bias_correction({"preprocessing": preprocessing}, None, stripped), mask_name)
    lesion_array = None
    if lesion is not None:
        lesion_mask = sitk.Cast(lesion > 0, sitk.sitkUInt8)
        lesion_array = sitk.GetArrayFromImage(to_model_space(lesion_mask, template, registration,
                                                             sitk.sitkNearestNeighbor)).astype(bool)
    return model_input, lesion_array, registration
