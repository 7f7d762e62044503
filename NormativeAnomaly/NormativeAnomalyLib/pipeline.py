"""The whole run, stage by stage, on an in-memory image: what the CLI, Slicer and web call.

``detect_anomalies`` reads nothing and writes nothing; ``outputs.write_outputs`` saves a
result. Per-stage seconds are recorded for run.json and the benchmark.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import NormativeAnomalyError, RegistrationError
from .device import resolve_precision, select_device
from .inference import DeviceUse, diffusion_settings, run_inference
from .input_space import to_input_grid
from .lesions import Segmentation, segment_anomalies
from .model_space import prepare_model_input
from .models.package import ModelPackage
from .progress import Monitor
from .registration import Registration, identity_registration, register_to_template
from .scoring import anomaly_map as score_anomalies
from .skull_stripping import brain_mask_of_stripped, looks_skull_stripped
from .volume_io import validate_volume


@dataclass
class RunOptions:
    device: str = "auto"
    registered: bool = False  # the input is already in the template's space: skip registration
    brain_mask: sitk.Image | None = None  # on the input's grid; default: the scan's own if skull-stripped, else the template's
    skull_stripped: bool | None = None  # None: detect (skull_stripping.looks_skull_stripped)
    threshold: float | None = None  # anomaly-map units; default: the calibrated one at ``fpr``
    fpr: float | None = None  # healthy false-positive rate; default: the model card's
    min_lesion_mm3: float | None = None
    bias_correction: bool | None = None  # N4; default: the model card's (see bias_correction)
    batch_size: int | None = None  # slices per batch; default: the card's, or on CUDA sized from free memory
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 (or fp16) on a GPU, fp32 on the CPU
    # Diffusion models: overrides of the card's noise_level, steps, samples, noise (None: the card's)
    diffusion: dict[str, Any] | None = None
    # Run even when the registered input does not look like the model's template (see check_alignment)
    accept_poor_alignment: bool = False
    # A registration of this input to the model's template computed before (e.g. by a run of another
    # model on the same template): reused instead of registering again
    registration: Registration | None = None


@dataclass
class AnomalyResult:
    """Everything a front end shows, all on the input's grid."""

    input_image: sitk.Image
    pseudo_healthy: sitk.Image
    anomaly_map: sitk.Image
    brain_mask: sitk.Image
    segmentation: Segmentation
    threshold_fpr: float
    model: ModelPackage
    registration: Registration
    device: str  # the device that finished the work (a GPU out of memory falls back to the CPU)
    seconds: dict[str, float] = field(default_factory=dict)
    # Variance over several stochastic reconstructions (diffusion models with samples > 1), else None
    uncertainty: sitk.Image | None = None
    # Precision, batch size and the fallbacks on the way (one line each), for run.json
    device_use: DeviceUse | None = None
    # Correlation of the registered input with the template inside the brain (model_space.alignment_quality)
    alignment: float = float("nan")
    # Whether the scan was taken as skull-stripped (its own brain mask scored)
    skull_stripped: bool = False
    # Order of the template's tissues in the registered input (model_space.tissue_order)
    tissue_order: float = float("nan")
    # A skull-stripped scan: Dice of its own brain, registered, with the template's (else NaN)
    brain_overlap: float = float("nan")


def resolve_threshold(package: ModelPackage, options: RunOptions,
                      notice: Callable[[str], None] = lambda message: None) -> tuple[float, float]:
    """(threshold, its healthy false-positive rate) from the options and the card.

    The calibration knows the rate only between its ends: a threshold or rate beyond is moved
    to the nearest end, with a ``notice``, so that the rate reported is the one used."""
    calibration = package.calibration
    if options.threshold is not None:
        if not options.threshold >= 0:  # NaN too
            raise NormativeAnomalyError(f"the threshold must not be negative, got {options.threshold} (the anomaly "
                                        "map is never below 0: every voxel of the image would be flagged)")
        lowest, highest = calibration.threshold[-1], calibration.threshold[0]
        threshold = min(max(float(options.threshold), lowest), highest)
        fpr = calibration.fpr_for_threshold(threshold)
        if threshold != options.threshold:
            notice(f"threshold {options.threshold:g} is outside the model's calibrated range {lowest:.4g} to "
                   f"{highest:.4g}: using {threshold:.4g} (healthy false-positive rate {fpr:.3g})")
        return threshold, fpr
    asked = options.fpr if options.fpr is not None else package.card["scoring"]["default_fpr"]
    if not 0 < asked < 1:
        raise NormativeAnomalyError(f"false-positive rate must be between 0 and 1, got {asked}")
    fpr = min(max(float(asked), calibration.fpr[0]), calibration.fpr[-1])
    threshold = calibration.threshold_for_fpr(fpr)
    if fpr != asked:
        notice(f"healthy false-positive rate {asked:g} is outside the model's calibrated range "
               f"{calibration.fpr[0]:g} to {calibration.fpr[-1]:g}: using {fpr:g} (threshold {threshold:.4g})")
    return threshold, fpr


@contextmanager
def _timed(seconds: dict[str, float], stage: str, monitor: Monitor) -> Iterator[None]:
    monitor.report(stage, 0.0)
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 3)
    monitor.report(stage, 1.0)


def detect_anomalies(image: sitk.Image, package: ModelPackage, options: RunOptions | None = None,
                     monitor: Monitor | None = None) -> AnomalyResult:
    options = options or RunOptions()
    monitor = monitor or Monitor()
    card, template = package.card, package.template
    seconds: dict[str, float] = {}
    image = validate_volume(image)
    device = select_device(options.device)
    resolve_precision(options.precision, device)  # a bad precision fails now, not after registration
    if package.family == "ddpm":
        diffusion_settings(package, options.diffusion)  # a bad override fails now, not after registration
    threshold, threshold_fpr = resolve_threshold(package, options, monitor.notice)
    min_lesion_mm3 = card["scoring"]["min_lesion_mm3"] if options.min_lesion_mm3 is None else options.min_lesion_mm3

    brain_mask, mask_name, skull_stripped = input_brain_mask(image, options)

    monitor.check()
    with _timed(seconds, "registration", monitor):
        if options.registered:
            registration = identity_registration()
        elif options.registration is not None:
            registration = options.registration
        else:
            registration = register_to_template(image, template.registration_target(skull_stripped),
                                                card["preprocessing"]["registration"], monitor)
    monitor.check()
    with _timed(seconds, "model_space", monitor):
        bias = bias_correction(card, options.bias_correction, skull_stripped)
        model_input = prepare_model_input(image, template, registration, card["preprocessing"]["normalisation"],
                                          brain_mask, bias, mask_name)
        # A given mask has its own fit check (model_space.check_mask_fits); a stripped scan's own brain this one.
        brain_overlap = model_input.brain_overlap if options.brain_mask is None else float("nan")
        if not options.accept_poor_alignment:
            try:
                check_alignment(model_input.alignment, card["modality"], model_input.tissue_order, brain_overlap)
            except RegistrationError as error:
                if options.skull_stripped and options.brain_mask is None:  # the statement may be why
                    raise RegistrationError(f"{error}; the scan was stated skull-stripped: one with its skull "
                                            "is registered wrongly so (--with-skull)") from None
                raise
    monitor.check()
    with _timed(seconds, "inference", monitor):
        inference = run_inference(package, model_input.image, model_input.brain_mask, device, monitor,
                                  options.batch_size, options.diffusion, options.precision)
        reconstruction, variance = inference.reconstruction, inference.variance
    monitor.check()
    with _timed(seconds, "scoring", monitor):
        spacing_zyx = tuple(reversed(template.image.GetSpacing()))
        scores = score_anomalies(model_input.image, reconstruction, model_input.brain_mask, spacing_zyx,
                                 card["scoring"], package.normative)
    monitor.check()
    with _timed(seconds, "to_input_grid", monitor):
        anomaly_map = to_input_grid(scores, template, registration, image)
        brain_on_input = to_input_grid(model_input.brain_mask.astype(np.float32), template, registration, image,
                                       sitk.sitkNearestNeighbor)
        pseudo_healthy = _pseudo_healthy_on_input(image, reconstruction, model_input, template, registration,
                                                  brain_on_input)
        brain_on_input = sitk.Cast(brain_on_input > 0.5, sitk.sitkUInt8)
        uncertainty = None if variance is None else to_input_grid(variance, template, registration, image)
    monitor.check()
    with _timed(seconds, "segmentation", monitor):
        segmentation = segment_anomalies(anomaly_map, threshold, min_lesion_mm3)
    monitor.report("done", 1.0)
    seconds["total"] = round(sum(seconds.values()), 3)
    return AnomalyResult(image, pseudo_healthy, anomaly_map, brain_on_input, segmentation, threshold_fpr, package,
                         registration, inference.use.device, seconds, uncertainty, inference.use,
                         model_input.alignment, skull_stripped, model_input.tissue_order, brain_overlap)


def bias_correction(card: dict, option: bool | None, skull_stripped: bool) -> bool:
    """Whether N4 runs: the option if given, else the card's (``"with_skull"``: for scans with their
    skull only: skull-stripped research scans have mostly been corrected before they were stripped,
    and statistics fitted on them hold for them as they are)."""
    setting = card["preprocessing"]["bias_correction"] if option is None else option
    return (not skull_stripped) if setting == "with_skull" else bool(setting)


def input_brain_mask(image: sitk.Image, options: RunOptions) -> tuple[sitk.Image | None, str, bool]:
    """(brain mask on the input's grid or None for the template's, how to name it in an error, skull-stripped?)"""
    if options.brain_mask is not None:
        return options.brain_mask, "the brain mask given (--mask)", bool(options.skull_stripped)
    stripped = looks_skull_stripped(image) if options.skull_stripped is None else options.skull_stripped
    if not stripped:
        return None, "", False
    how = "stated skull-stripped" if options.skull_stripped else "it looks skull-stripped; --with-skull if it is not"
    return brain_mask_of_stripped(image), f"the scan's own brain ({how})", True


# Correlation of a registered input with its template over the brain (model_space.alignment_quality),
# per contrast, measured by scripts/alignment_cutoff.py (docs/alignment.md) on real scans and on
# failures, each registered as a run registers it. T1: real heads and real skull-stripped BraTS T1
# scans 0.47 and above; scans stored upside down or back to front, non-brain anatomy, noise, a
# partial field of view and other contrasts 0.40 and below. T2 correlates less with its template,
# lesions or not: real BraTS T2 scans 0.20 and above; T2 scans stored upside down or back to front,
# FLAIR, T1 and non-brain inputs 0.14 and below. FLAIR (a template synthesised from T1 and T2, which
# real FLAIR resembles less): real BraTS FLAIR 0.15 and above; T2, noise and a chest 0.07 and below,
# but FLAIR stored upside down or back to front 0.11-0.21: only some are refused.
ALIGNMENT_CUTOFFS = {"T1": 0.45, "T2": 0.17, "FLAIR": 0.12}
# The correlation cannot tell FLAIR from T1 (CSF is dark on both): the order of the template's tissues
# in the input can (model_space.tissue_order). Measured: real scans of the model's contrast T1 +0.09
# and above, T2 +0.04 and above, FLAIR -0.05 and above; T1 and T2 scans given to the FLAIR model
# -0.06 and below (one BraTS T1 at -0.059 passes: the margin is kept on the side of real FLAIR).
TISSUE_ORDER_MINIMA = {"T1": 0.0, "T2": 0.0, "FLAIR": -0.06}
# A skull-stripped scan's own brain, registered to the template's brain, overlaps it (Dice) by far
# more than this; the brain's shape tells a scan stored upside down or back to front even where the
# contrast cannot (FLAIR). Measured on BraTS, all three contrasts: real scans 0.915 and above, stored
# upside down or back to front 0.893 and below.
MIN_BRAIN_OVERLAP = 0.9


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


def _pseudo_healthy_on_input(image: sitk.Image, reconstruction: np.ndarray | None, model_input, template,
                             registration: Registration, brain_on_input: sitk.Image) -> sitk.Image:
    """The reconstruction in the input's intensity units inside the brain, the input itself outside.

    So fading between input and pseudo-healthy in Slicer changes only what the model changed.
    The intensity baseline has no reconstruction: its pseudo-healthy image is the input.
    """
    if reconstruction is None:
        return sitk.Image(image)
    in_units = model_input.normalisation.inverse(reconstruction)
    on_input = to_input_grid(in_units, template, registration, image)
    inside = sitk.GetArrayViewFromImage(brain_on_input) > 0.5
    blended = np.where(inside, sitk.GetArrayViewFromImage(on_input), sitk.GetArrayViewFromImage(image))
    result = sitk.GetImageFromArray(blended.astype(np.float32))
    result.CopyInformation(image)
    return result
