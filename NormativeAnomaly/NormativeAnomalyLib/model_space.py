"""Into model space: brain mask, optional N4, resampling to the template grid, normalisation.

The model sees the input as it saw its training data: on the template's grid, brain only,
intensities scaled by robust percentiles inside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError
from .registration import Registration
from .templates import Template


@dataclass(frozen=True)
class Normalisation:
    """Linear map from input intensities to model units (``lower`` -> 0, ``upper`` -> 1)."""

    lower: float
    upper: float
    clip: tuple[float, float]

    def forward(self, values: np.ndarray) -> np.ndarray:
        scaled = (values - self.lower) / (self.upper - self.lower)
        return np.clip(scaled, *self.clip).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return (values * (self.upper - self.lower) + self.lower).astype(np.float32)


@dataclass(frozen=True)
class ModelSpaceInput:
    image: np.ndarray  # normalised, zero outside the brain, (z, y, x) on the template grid
    brain_mask: np.ndarray  # bool, same grid
    normalisation: Normalisation
    # Correlation of the registered input with the template inside the brain: see alignment_quality
    alignment: float = float("nan")


def to_model_space(image: sitk.Image, template: Template, registration: Registration,
                   interpolator: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Resample an input-grid image onto the template grid through the registration."""
    pixel = sitk.sitkUInt8 if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, template.image, registration.transform, interpolator, default, pixel)


def bias_correct(image: sitk.Image, brain_mask: sitk.Image, shrink: int = 2) -> sitk.Image:
    """N4 bias-field correction, fitted on a shrunk copy for speed and applied at full size."""
    small = sitk.Shrink(image, [shrink] * 3)
    small_mask = sitk.Shrink(brain_mask, [shrink] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([40, 30, 20])
    corrector.Execute(sitk.Abs(small) + 1e-3, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)


def prepare_model_input(image: sitk.Image, template: Template, registration: Registration, normalisation: dict,
                        brain_mask_on_input: sitk.Image | None = None, bias_correction: bool = False) -> ModelSpaceInput:
    """Bring ``image`` into model space; the brain mask is the template's unless one is given."""
    resampled = to_model_space(image, template, registration)
    if brain_mask_on_input is not None:
        mask = to_model_space(brain_mask_on_input, template, registration, sitk.sitkNearestNeighbor)
    else:
        mask = template.brain_mask
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside_field = to_model_space(ones, template, registration, sitk.sitkNearestNeighbor)  # the input's field of view
    mask = sitk.And(sitk.Cast(mask > 0, sitk.sitkUInt8), inside_field)
    brain = sitk.GetArrayFromImage(mask).astype(bool)
    if brain.sum() < 0.05 * template.brain_mask_voxels:
        raise InputVolumeError(
            "less than 5% of the template's brain falls inside the input after registration; "
            "is this a brain MRI, or is the field of view cut?"
        )
    if bias_correction:
        resampled = bias_correct(resampled, mask)
    values = sitk.GetArrayFromImage(resampled)
    lower, upper = np.percentile(values[brain], [normalisation["lower"], normalisation["upper"]])
    if upper <= lower:
        raise InputVolumeError("the brain region of the input has no contrast after registration")
    scale = Normalisation(float(lower), float(upper), tuple(normalisation["clip"]))
    normalised = np.where(brain, scale.forward(values), 0.0).astype(np.float32)
    alignment = alignment_quality(sitk.GetArrayViewFromImage(template.image), values, brain)
    return ModelSpaceInput(normalised, brain, scale, alignment)


def alignment_quality(template_values: np.ndarray, input_values: np.ndarray, brain: np.ndarray) -> float:
    """Pearson correlation of template and registered input over the brain, both smoothed by one
    voxel (1 = identical up to a linear intensity change).

    Mattes mutual information, which registration optimises, has no fixed scale to judge a
    result by; this has one. A well-registered scan of the model's contrast correlates highly
    with its template; a failed registration, non-brain anatomy or noise does not, and another
    contrast (a T2 given to a T1 model: CSF bright instead of dark) correlates negatively. The
    smoothing keeps a real scan's noise from passing for misalignment.
    """
    from scipy import ndimage

    a = ndimage.gaussian_filter(template_values.astype(np.float64), 1.0)[brain]
    b = ndimage.gaussian_filter(input_values.astype(np.float64), 1.0)[brain]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
