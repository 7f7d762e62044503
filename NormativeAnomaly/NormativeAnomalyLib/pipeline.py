"""The whole run, stage by stage, on an in-memory image: what the CLI, Slicer and web call.

``detect_anomalies`` reads nothing and writes nothing; ``outputs.write_outputs`` saves a
result. Per-stage seconds are recorded for run.json and the benchmark.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import NormativeAnomalyError, RegistrationError
from .device import resolve_precision, select_device
from .inference import DeviceUse, diffusion_settings, run_on_model_input
from .input_space import to_input_grid
from .lesions import Segmentation, segment_anomalies
from .model_space import check_alignment, prepare_model_input
from .models.package import ModelPackage
from .options import RunOptions
from .progress import Monitor
from .registration import Registration, identity_registration, partial_field_of_view, register_scan
from .scoring import anomaly_map as score_anomalies
from .skull_stripping import brain_mask_of_stripped, looks_skull_stripped
from .volume_io import validate_volume


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
    # The scan holds only part of the brain (registration.partial_field_of_view): that part is scored
    partial_field_of_view: bool = False


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
    partial = partial_field_of_view(image, template)
    if partial:
        monitor.notice("the scan holds only part of the brain (its field of view is narrower than the template's "
                       "brain): it is registered within its field of view, and only the part it holds is scored")

    monitor.check()
    with _timed(seconds, "registration", monitor):
        if options.registered:
            registration = identity_registration()
        elif options.registration is not None:
            registration = options.registration
        else:
            registration = register_scan(image, template, skull_stripped, card["preprocessing"]["registration"],
                                         monitor)
    monitor.check()
    with _timed(seconds, "model_space", monitor):
        bias = bias_correction(card, options.bias_correction, skull_stripped)
        model_input = prepare_model_input(image, template, registration, card["preprocessing"]["normalisation"],
                                          brain_mask, bias, mask_name, card["modality"])
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
        inference = run_on_model_input(package, model_input, device, monitor, options.batch_size, options.diffusion,
                                       options.precision)
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
                         model_input.alignment, skull_stripped, model_input.tissue_order, brain_overlap, partial)


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
