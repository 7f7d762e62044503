"""Into model space: brain mask, optional N4, resampling to the template grid, normalisation.

The model sees the input as it saw its training data: on the template's grid, brain only,
intensities scaled by robust percentiles inside the brain.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, RegistrationError
from .registration import Registration, partial_field_of_view
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
    # Whether its tissues are ordered as the template's: see tissue_order
    tissue_order: float = float("nan")
    # Dice of the given brain mask (registered) with the template's brain; NaN when none is given
    brain_overlap: float = float("nan")
    # An input holding only part of the brain (a crop, a slab): what the network is given instead, the
    # template's brain in model units where the input's field of view ends (see with_surroundings)
    network_image: np.ndarray | None = None
    network_mask: np.ndarray | None = None

    def network_input(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, brain mask) for the network; its reconstruction is scored on ``brain_mask`` only."""
        if self.network_image is None or self.network_mask is None:
            return self.image, self.brain_mask
        return self.network_image, self.network_mask


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
                        brain_mask_on_input: sitk.Image | None = None, bias_correction: bool = False,
                        mask_name: str = "the brain mask given (--mask)", modality: str | None = None) -> ModelSpaceInput:
    """Bring ``image`` into model space; the brain mask is the template's unless one is given
    (``mask_name`` names it in the error when it does not fit the registered brain). ``modality``: the
    model's contrast, which says how its tissue order is measured (TISSUE_BAND_EROSION)."""
    resampled = to_model_space(image, template, registration)
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside_field = to_model_space(ones, template, registration, sitk.sitkNearestNeighbor)  # the input's field of view
    mask = _inside(template.brain_mask, inside_field)
    template_brain = sitk.GetArrayFromImage(mask).astype(bool)
    if template_brain.sum() < 0.05 * template.brain_mask_voxels:
        raise InputVolumeError(
            "less than 5% of the template's brain falls inside the input after registration; "
            "is this a brain MRI, or is the field of view cut?"
        )
    if brain_mask_on_input is not None:
        mask = _inside(to_model_space(brain_mask_on_input, template, registration, sitk.sitkNearestNeighbor),
                       inside_field)
        given = sitk.GetArrayFromImage(mask).astype(bool)
        check_mask_fits(given, template_brain, mask_name)
        # Judged against the template's brain as the input's own slices would hold it (thick slices:
        # a slice is brain where any part of it is), so that thick slices do not pass for a wrong shape.
        sliced = sitk.GetArrayFromImage(_inside(brain_as_sliced(template, image, registration), inside_field))
        sliced = sliced.astype(bool)
        brain_overlap = 2.0 * float((given & sliced).sum()) / max(int(given.sum() + sliced.sum()), 1)
    else:
        brain_overlap = float("nan")
    brain = sitk.GetArrayFromImage(mask).astype(bool)
    if bias_correction:
        resampled = bias_correct(resampled, mask)
    values = sitk.GetArrayFromImage(resampled)
    field_of_view = sitk.GetArrayViewFromImage(inside_field).astype(bool)
    # An input holding only part of the brain is normalised, and surrounded, by the template in model units.
    reference = template_in_model_units(template, normalisation) if partial_field_of_view(
        image, template) else None
    scale = _normalisation(values, brain, normalisation, reference)
    normalised = np.where(brain, scale.forward(values), 0.0).astype(np.float32)
    network_image = network_mask = None
    if reference is not None:
        network_image, network_mask = with_surroundings(normalised, brain, field_of_view, template, reference)
    # Judged on the template's brain whatever mask is given: a bad mask must not pass for a failed registration.
    template_values = sitk.GetArrayViewFromImage(template.image)
    alignment = alignment_quality(template_values, values, template_brain, field_of_view)
    order = tissue_order(template_values, values, template_brain, TISSUE_BAND_EROSION.get(modality, 0),
                         sitk.GetArrayViewFromImage(template.brain_mask) > 0)
    return ModelSpaceInput(normalised, brain, scale, alignment, order, brain_overlap, network_image, network_mask)


def template_in_model_units(template: Template, normalisation: dict) -> np.ndarray:
    """The template's image normalised over its own brain as an input is over its brain, zero outside it."""
    values = sitk.GetArrayFromImage(template.image)
    brain = sitk.GetArrayViewFromImage(template.brain_mask) > 0
    scale = _normalisation(values, brain, normalisation)
    return np.where(brain, scale.forward(values), 0.0).astype(np.float32)


def _normalisation(values: np.ndarray, brain: np.ndarray, normalisation: dict,
                   reference: np.ndarray | None = None) -> Normalisation:
    """The input's ``lower`` and ``upper`` percentiles over ``brain`` to 0 and 1; with ``reference`` (the
    template in model units), to the reference's own percentiles over the same voxels: a crop of the
    brain holds another mix of tissues than the whole (a slab at the vertex has hardly any CSF), and
    over the whole brain the template's percentiles are 0 and 1."""
    percentiles = [normalisation["lower"], normalisation["upper"]]
    lower, upper = (float(v) for v in np.percentile(values[brain], percentiles))
    if upper <= lower:
        raise InputVolumeError("the brain region of the input has no contrast after registration")
    if reference is not None:
        low, high = (float(v) for v in np.percentile(reference[brain], percentiles))
        if high > low:  # the input's lower and upper are where the reference's low and high are
            span = (upper - lower) / (high - low)
            lower, upper = lower - low * span, lower + (1.0 - low) * span
    return Normalisation(lower, upper, tuple(normalisation["clip"]))


def with_surroundings(normalised: np.ndarray, brain: np.ndarray, field_of_view: np.ndarray, template: Template,
                      surroundings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, brain mask) with ``surroundings`` (the template in model units) over the template's brain
    where the input's field of view ends: a slice model given a crop cut out of its surroundings
    reconstructs it far worse (the central 66x82x50 mm of a real head: twice the residual the same
    voxels have in the whole head)."""
    template_brain = sitk.GetArrayViewFromImage(template.brain_mask) > 0
    beyond = template_brain & ~field_of_view
    image = np.where(beyond, surroundings, normalised).astype(np.float32)
    return image, brain | beyond


def brain_as_sliced(template: Template, image: sitk.Image, registration: Registration) -> sitk.Image:
    """The template's brain mask (template grid) as ``image``'s grid holds it: on an axis whose
    spacing spans several template voxels (thick slices), a voxel is brain where any part of it is,
    as the foreground of a thick skull-stripped scan is. The mask itself on a grid as fine as the
    template's."""
    step = min(template.image.GetSpacing())
    # Parts per voxel: enough template-voxel-sized samples to cover it (a 5 mm slice: 3 of a 2 mm grid).
    counts = [max(1, math.ceil(spacing / step - 0.25)) for spacing in image.GetSpacing()]
    if max(counts) == 1:
        return template.brain_mask
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    axes = np.array(image.GetDirection()).reshape(3, 3)
    inverse = registration.transform.GetInverse()
    sliced = None
    for parts in itertools.product(*(range(n) for n in counts)):
        # Offset to the centre of this part of the voxel, in physical units along the input's axes.
        shift = axes @ np.array([((k + 0.5) / n - 0.5) * spacing
                                 for k, n, spacing in zip(parts, counts, image.GetSpacing())])
        offset = sitk.CompositeTransform([inverse, sitk.TranslationTransform(3, tuple(float(v) for v in shift))])
        part = sitk.Resample(template.brain_mask, grid, offset, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        sliced = part if sliced is None else sitk.Or(sliced, part)
    return to_model_space(sliced, template, registration, sitk.sitkNearestNeighbor)


def _inside(mask: sitk.Image, inside_field: sitk.Image) -> sitk.Image:
    return sitk.And(sitk.Cast(mask > 0, sitk.sitkUInt8), inside_field)


# A brain mask of the scan overlaps the template's brain, once registered, by far more than this
# (brain extraction tools and the template agree to a Dice of about 0.9).
MIN_MASK_FIT = 0.5


def check_mask_fits(mask: np.ndarray, template_brain: np.ndarray,
                    mask_name: str = "the brain mask given (--mask)") -> None:
    """Refuse a given brain mask that covers little of the registered brain or lies mostly outside
    it (another scan's mask, a lesion mask, a shifted grid), naming the mask, not the input."""
    overlap = int(np.logical_and(mask, template_brain).sum())
    covered, inside = overlap / max(int(template_brain.sum()), 1), overlap / max(int(mask.sum()), 1)
    if covered < MIN_MASK_FIT or inside < MIN_MASK_FIT:
        raise InputVolumeError(
            f"{mask_name} covers {covered:.0%} of the brain after registration and "
            f"{1 - inside:.0%} of it lies outside the brain: it is not this scan's brain mask; give the mask made "
            "from this scan (on its grid), or none to use the model's")


def alignment_quality(template_values: np.ndarray, input_values: np.ndarray, brain: np.ndarray,
                      field_of_view: np.ndarray | None = None) -> float:
    """Pearson correlation of template and registered input over the brain, both smoothed by one
    voxel (1 = identical up to a linear intensity change). ``field_of_view``: where the input has
    values; the input is smoothed within it only, so that its edge does not blur into the empty
    space beyond (a crop, a slab).

    Mattes mutual information, which registration optimises, has no fixed scale to judge a
    result by; this has one. A well-registered scan of the model's contrast correlates highly
    with its template; a failed registration, non-brain anatomy or noise does not, and another
    contrast (a T2 given to a T1 model: CSF bright instead of dark) correlates negatively. The
    smoothing keeps a real scan's noise from passing for misalignment.
    """
    from scipy import ndimage

    a = ndimage.gaussian_filter(template_values.astype(np.float64), 1.0)[brain]
    if field_of_view is None or field_of_view.all():
        b = ndimage.gaussian_filter(input_values.astype(np.float64), 1.0)[brain]
    else:  # normalised convolution: the weighted mean of the input's own values near each voxel
        inside = field_of_view.astype(np.float64)
        weight = ndimage.gaussian_filter(inside, 1.0)[brain]
        b = ndimage.gaussian_filter(input_values * inside, 1.0)[brain] / np.maximum(weight, 1e-6)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# The template's brain split by its own intensity: its darkest, middle and brightest bands (as
# percentiles), which are tissues of different kinds in every contrast (CSF, white and grey matter
# in some order), whatever the contrast.
TISSUE_BANDS = ((0.0, 15.0), (40.0, 60.0), (80.0, 100.0))
# Per contrast, template voxels each band is eroded by first. The FLAIR-like template is made from fuzzy
# tissue memberships, so its bands' edges mix tissues: eroded by one voxel, a band's median comes from
# inside a tissue, and T1 scans given to the FLAIR model fall to -0.19 and below while real FLAIR stays
# at -0.12 and above (uneroded, one T1 at -0.059 passed for FLAIR at -0.061). Eroding the T1 template's
# bands instead lifted FLAIR scans given to the T1 model to +0.035, near real T1 at +0.057: not eroded.
TISSUE_BAND_EROSION = {"FLAIR": 1}


def tissue_order(template_values: np.ndarray, input_values: np.ndarray, brain: np.ndarray, erosion: int = 0,
                 template_brain: np.ndarray | None = None) -> float:
    """Whether the registered input orders the template's tissues as the template does: the smaller
    step between the input's medians over the template's dark, middle and bright bands (each eroded by
    ``erosion`` voxels), as a fraction of the input's 5th-95th percentile range over the brain (> 0:
    same order). ``template_brain``: the template's whole brain, where the bands are drawn (default
    ``brain``); the medians come from ``brain`` only. Bands drawn on the part of the brain a crop
    holds would be other tissues: in a central crop, mostly white matter, the middle band is white
    matter too.

    The correlation alone cannot tell FLAIR from T1 (CSF is dark on both, and it dominates); the
    order of grey and white matter can: a T1 scan given to a FLAIR model has its grey matter darker
    than its white matter, the FLAIR template the other way round.
    """
    from scipy import ndimage

    values = input_values[brain].astype(np.float64)
    if values.size < 100:
        return 0.0
    whole = brain if template_brain is None else template_brain
    edges = np.percentile(template_values[whole], [edge for band in TISSUE_BANDS for edge in band])
    medians = []
    for k in range(len(TISSUE_BANDS)):
        band = whole & (template_values >= edges[2 * k]) & (template_values <= edges[2 * k + 1])
        inside = (ndimage.binary_erosion(band, iterations=erosion) if erosion else band) & brain
        medians.append(float(np.median(input_values[inside])) if inside.any() else 0.0)
    low, high = np.percentile(values, [5, 95])
    if high <= low:
        return 0.0
    return float(min(medians[1] - medians[0], medians[2] - medians[1]) / (high - low))


# Correlation of a registered input with its template over the brain (model_space.alignment_quality),
# per contrast, measured by scripts/alignment_cutoff.py (docs/alignment.md) on real scans and on
# failures, each registered as a run registers it. T1: real heads and real skull-stripped BraTS T1
# scans 0.47 and above (a real crop of the central brain 0.66; central 60 mm slabs of the BraTS T1
# scans 0.54 and above, but one that is mostly tumour, 0.33); scans stored upside down or back to
# front, non-brain anatomy, noise, a field of view holding too little brain and other contrasts 0.40
# and below. T2 correlates less with its template,
# lesions or not: real BraTS T2 scans 0.20 and above; T2 scans stored upside down or back to front,
# FLAIR, T1 and non-brain inputs 0.14 and below. FLAIR (a template synthesised from T1 and T2, which
# real FLAIR resembles less): real BraTS FLAIR 0.15 and above; T2, noise and a chest 0.07 and below,
# but FLAIR stored upside down or back to front 0.11-0.28: only some are refused (the brain overlap
# below refuses the rest).
ALIGNMENT_CUTOFFS = {"T1": 0.45, "T2": 0.17, "FLAIR": 0.12}
# The correlation cannot tell FLAIR from T1 (CSF is dark on both): the order of the template's tissues
# in the input can (model_space.tissue_order, its bands eroded as TISSUE_BAND_EROSION says). Measured:
# real scans of the model's contrast T1 +0.09 and above, T2 +0.03 and above, FLAIR -0.121 and above (1 mm
# and 5 mm slices); T1 and T2 scans given to the FLAIR model -0.188 and below, FLAIR and T2 scans given to
# the T1 model -0.02 and below.
TISSUE_ORDER_MINIMA = {"T1": 0.0, "T2": 0.0, "FLAIR": -0.15}
# A skull-stripped scan's own brain, registered to the template's brain (as the scan's slices hold it:
# brain_as_sliced), overlaps it (Dice) by more than this; the brain's shape tells a scan stored upside
# down or back to front even where the contrast cannot (FLAIR). Measured on BraTS, all three contrasts:
# real scans 0.915 and above at 1 mm, 0.917 and above in 5 mm slices; stored upside down or back to
# front 0.893 and below at 1 mm, 0.905 and below in 5 mm slices (one T1 in 5 mm slices at 0.916, which
# its correlation refuses).
MIN_BRAIN_OVERLAP = 0.91


def alignment_cutoff(modality: str) -> float:
    """The cut-off for a model of this contrast (the strictest one for a contrast not measured)."""
    return ALIGNMENT_CUTOFFS.get(modality, max(ALIGNMENT_CUTOFFS.values()))


def tissue_order_minimum(modality: str) -> float:
    """The least tissue order a run of a model of this contrast accepts (0: the template's order)."""
    return TISSUE_ORDER_MINIMA.get(modality, 0.0)


def check_alignment(alignment: float, modality: str, tissue_order: float = float("inf"),
                    brain_overlap: float = float("nan")) -> None:
    """Refuse a run whose registered input does not look like the model's template: a failed
    registration, non-brain anatomy or another contrast would otherwise give confident nonsense.
    ``brain_overlap``: a skull-stripped scan's own brain against the template's (NaN: not checked)."""
    if brain_overlap < MIN_BRAIN_OVERLAP:
        raise RegistrationError(
            f"the skull-stripped scan's brain, registered, overlaps the template's brain by Dice {brain_overlap:.2f} "
            f"(at least {MIN_BRAIN_OVERLAP} expected): stored upside down or back to front, or registration failed; "
            "check the input, or run anyway with --accept-poor-alignment")
    cutoff = alignment_cutoff(modality)
    minimum = tissue_order_minimum(modality)
    if alignment >= cutoff and tissue_order >= minimum:
        return
    if alignment >= cutoff:
        raise RegistrationError(
            f"the registered input orders its tissues unlike the model's {modality} template (tissue order "
            f"{tissue_order:.2f}, minimum {minimum} for {modality}; grey and white matter the other way round?): "
            f"another contrast, not {modality}? Check the input, or run anyway with --accept-poor-alignment")
    if alignment <= -cutoff:
        why = f"its contrast looks inverted relative to the model's {modality} template (another modality?)"
    else:
        why = f"registration failed, or this is not a {modality} brain MRI"
    raise RegistrationError(
        f"the registered input correlates {alignment:.2f} with the model's template over the brain "
        f"(cut-off {cutoff} for {modality}): {why}; check the input, or run anyway with --accept-poor-alignment")
