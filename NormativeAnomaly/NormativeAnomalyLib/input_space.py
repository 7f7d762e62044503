"""Back to the input: model-space results resampled onto the input volume's own grid.

Through the inverse of the registration, so that the anomaly map, the pseudo-healthy
reconstruction and the segmentation overlay the input exactly in Slicer (same size,
spacing, origin and direction).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .registration import Registration
from .templates import Template


def to_input_grid(values: np.ndarray, template: Template, registration: Registration, reference: sitk.Image,
                  interpolator: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Resample a model-space array (z, y, x on the template grid) onto ``reference``'s grid."""
    model_image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    model_image.CopyInformation(template.image)
    inverse = registration.transform.GetInverse()
    return sitk.Resample(model_image, reference, inverse, interpolator, default, sitk.sitkFloat32)
