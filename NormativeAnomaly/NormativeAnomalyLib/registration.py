"""Affine alignment of an input scan to a model's template (SimpleITK).

Rigid then affine, multi-resolution, Mattes mutual information (so T1/T2 inputs register
to either template). The returned transform maps template points to input points, the
SimpleITK convention: ``Resample(input, template, transform)`` brings the input into model
space, and ``transform.GetInverse()`` brings model-space maps back onto the input's grid.

An input that holds only part of a brain (a slab, a crop) is registered the other way round,
the template onto the input, so that the metric samples only what the input holds, then inverted.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import RegistrationError
from .progress import Monitor
from .templates import Template, resample_to_grid, world_extent

# Fixes the metric's sample points.
SEED = 20261129
# One thread for the metric: ITK sums its per-thread parts in whatever order the threads finish,
# and on a flat metric that moves the optimum, so the same scan could pass the alignment check on
# one run and fail it on the next. Deterministic costs about a third more time on 2 cores.
REGISTRATION_THREADS = 1
# Metric sample fractions per level (shrink 4, 2, 1) over the template's grid: 4% of its 1M voxels at
# full resolution (~40k points) pin an affine down well; coarse levels get more for robustness.
SAMPLING = (0.25, 0.1, 0.04)
# An input narrower than this fraction of the template's brain along an axis (a slab, a crop) is
# registered within its own field of view: with the template fixed, most of its points would fall
# outside the input, and the metric would be optimised over a small, arbitrary overlap.
PARTIAL_FIELD_OF_VIEW = 0.6


@dataclass(frozen=True)
class Registration:
    transform: sitk.Transform
    kind: str  # "affine", "rigid", "none" or "affine+bspline" (refine_deformable)
    metric: float  # final Mattes MI at the finest level (more negative is better)
    seconds: float


def identity_registration() -> Registration:
    return Registration(sitk.AffineTransform(3), "none", float("nan"), 0.0)


def register_to_template(moving: sitk.Image, template: sitk.Image, kind: str = "affine",
                         monitor: Monitor | None = None, within_field_of_view: bool = False) -> Registration:
    """Register ``moving`` (the input scan) to ``template`` (fixed); ``within_field_of_view``: the other
    way round, for an input that holds only part of the brain (``partial_field_of_view``)."""
    if kind not in ("affine", "rigid"):
        raise ValueError(f"unknown registration kind {kind!r}")
    monitor = monitor or Monitor()
    with _threads(REGISTRATION_THREADS):
        if within_field_of_view:
            return _register_within_field_of_view(moving, template, kind, monitor)
        return _register(moving, template, kind, monitor)


def register_scan(image: sitk.Image, template: Template, skull_stripped: bool, kind: str = "affine",
                  monitor: Monitor | None = None) -> Registration:
    """A scan registered as a run registers it: to the template's brain when it is skull-stripped,
    else to its head; within its own field of view when it holds only part of the brain."""
    return register_to_template(image, template.registration_target(skull_stripped), kind, monitor,
                                partial_field_of_view(image, template))


def partial_field_of_view(image: sitk.Image, template: Template) -> bool:
    """Whether ``image``'s field of view is narrower than PARTIAL_FIELD_OF_VIEW of the template's brain
    along a world axis."""
    return bool(np.any(world_extent(image) < PARTIAL_FIELD_OF_VIEW * template.brain_extent_mm))


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """ITK's default thread count for the filters created inside (the metric takes the default,
    not its registration method's own setting)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register(moving: sitk.Image, template: sitk.Image, kind: str, monitor: Monitor) -> Registration:
    start = time.perf_counter()
    fixed = sitk.Cast(template, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    transform, metric = _rigid_then_refined(fixed, moving, [initial], kind, monitor, SAMPLING)
    return Registration(transform, kind, metric, time.perf_counter() - start)


def _register_within_field_of_view(moving: sitk.Image, template: sitk.Image, kind: str,
                                   monitor: Monitor) -> Registration:
    """The template registered onto the input (fixed), on a grid of the template's spacing over the
    input's field of view, from two starts: the input's own world coordinates (a crop of a scan
    already in template space keeps its place) and its centre of mass on the template's; the better
    rigid fit is refined. Inverted, the result maps template points to input points, as ``_register``'s."""
    start = time.perf_counter()
    spacing = np.asarray(template.GetSpacing())
    extent = np.asarray(moving.GetSize()) * np.asarray(moving.GetSpacing())
    size = [max(1, int(n)) for n in np.floor(extent / spacing)]
    fixed = resample_to_grid(sitk.Cast(moving, sitk.sitkFloat32), size, spacing.tolist())
    target = sitk.Cast(template, sitk.sitkFloat32)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    as_stored = sitk.Euler3DTransform()
    as_stored.SetCenter(centre)
    by_mass = sitk.CenteredTransformInitializer(fixed, target, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    # As many metric samples per level as the template's grid would give, from the smaller grid.
    template_voxels, fixed_voxels = float(np.prod(template.GetSize())), float(np.prod(fixed.GetSize()))
    sampling = tuple(min(1.0, fraction * template_voxels / fixed_voxels) for fraction in SAMPLING)
    transform, metric = _rigid_then_refined(fixed, target, [as_stored, by_mass], kind, monitor, sampling)
    inverse = sitk.AffineTransform(transform.GetInverse()) if kind == "affine" else sitk.Euler3DTransform(
        transform.GetInverse())
    return Registration(inverse, kind, metric, time.perf_counter() - start)


def _rigid_then_refined(fixed: sitk.Image, moving: sitk.Image, starts: list[sitk.Transform], kind: str,
                        monitor: Monitor, sampling: tuple[float, ...]) -> tuple[sitk.Transform, float]:
    """A rigid search from each start (the best metric kept), refined at the two finest levels as an
    affine (12 parameters) or still rigid (6)."""
    monitor.report("registration", 0.0)
    fits, failure = [], None
    for k, initial in enumerate(starts):
        share = 0.5 / len(starts)
        try:
            fits.append(_run_stage(fixed, moving, initial, shrink=[4, 2, 1], smooth=[2.0, 1.0, 0.0], iterations=80,
                                   coarse_search=True, monitor=monitor, span=(k * share, (k + 1) * share),
                                   sampling=sampling))
        except RegistrationError as error:  # a start that leaves the images apart: the next may not
            failure = error
        monitor.check()
    if not fits:
        raise failure or RegistrationError("registration to the template failed")
    rigid = min(fits, key=lambda fit: fit[1] if np.isfinite(fit[1]) else np.inf)[0]
    if kind == "affine":
        refined: sitk.Transform = sitk.AffineTransform(3)
        refined.SetMatrix(rigid.GetMatrix())
        refined.SetTranslation(rigid.GetTranslation())
        refined.SetCenter(rigid.GetCenter())
    else:
        refined = sitk.Euler3DTransform(rigid)
    transform, metric = _run_stage(fixed, moving, refined, shrink=[2, 1], smooth=[1.0, 0.0], iterations=60,
                                   coarse_search=False, monitor=monitor, span=(0.5, 1.0), sampling=sampling)
    if not np.isfinite(metric):
        raise RegistrationError("registration to the template diverged; is this a brain MRI?")
    monitor.report("registration", 1.0)
    return transform, metric


def _run_stage(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, *, shrink: list[int],
               smooth: list[float], iterations: int, monitor: Monitor, span: tuple[float, float],
               coarse_search: bool, sampling: tuple[float, ...] = SAMPLING):
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(sampling[-len(shrink):], SEED)
    method.SetInterpolator(sitk.sitkLinear)
    if coarse_search:
        # Rigid stage: gradient descent with a learning rate re-estimated each iteration takes
        # the large steps a badly positioned head needs, and stops once the metric is flat.
        method.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=iterations,
                                             convergenceMinimumValue=1e-6, convergenceWindowSize=10,
                                             estimateLearningRate=method.EachIteration,
                                             maximumStepSizeInPhysicalUnits=2.0)
    else:
        # Affine refinement: regular-step descent halves its step as it closes in (sub-mm precision).
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    _watch(method, monitor, len(shrink), span)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as error:
        monitor.check()
        raise RegistrationError(f"registration to the template failed: {str(error).splitlines()[-1]}") from None
    monitor.check()
    # Execute returns a composite of (initial, optimised); flatten to the optimised transform.
    if isinstance(result, sitk.CompositeTransform) or result.GetName() == "CompositeTransform":
        result = sitk.CompositeTransform(result).GetNthTransform(0)
    typed = sitk.AffineTransform(result) if isinstance(initial, sitk.AffineTransform) else sitk.Euler3DTransform(result)
    return typed, method.GetMetricValue()


# B-spline refinement: two coarse levels only (the template is at 2 mm: shrink 2 is a 4 mm grid,
# fine enough for a warp whose control points lie centimetres apart). An evaluation costs samples
# times control points (ITK fills a dense Jacobian per sample), so the affine's sampling and few
# iterations: a 20 mm mesh (7k parameters) then takes about half a minute on one thread.
BSPLINE_SHRINK = [4, 2]
BSPLINE_SMOOTH_MM = [4.0, 2.0]
BSPLINE_SAMPLING = [0.2, 0.04]
BSPLINE_ITERATIONS = 25


def refine_deformable(moving: sitk.Image, template: sitk.Image, affine: Registration, control_spacing_mm: float,
                      monitor: Monitor | None = None) -> Registration:
    """A cubic B-spline warp on top of ``affine``, control points ``control_spacing_mm`` apart over
    the template (fixed), Mattes MI, LBFGSB. The result maps template points to input points like
    the affine: ``CompositeTransform([affine, bspline])`` applies the warp first, then the affine.

    A measurement tool only: a B-spline has no analytic inverse, so its maps cannot go back onto
    the input's grid as the pipeline's do. The control spacing is the only regulariser: a coarse
    mesh cannot fold a tumour into healthy tissue, a fine one can."""
    if control_spacing_mm <= 0:
        raise ValueError("control_spacing_mm must be positive")
    monitor = monitor or Monitor()
    start = time.perf_counter()
    fixed = sitk.Cast(template, sitk.sitkFloat32)
    extent = [size * spacing for size, spacing in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(length / control_spacing_mm))) for length in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(BSPLINE_SAMPLING, SEED)
    method.SetInterpolator(sitk.sitkLinear)
    # LBFGSB needs no parameter scales (estimating them for thousands of control points is slow).
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * BSPLINE_ITERATIONS,
                                costFunctionConvergenceFactor=1e7)
    method.SetShrinkFactorsPerLevel(BSPLINE_SHRINK)
    method.SetSmoothingSigmasPerLevel(BSPLINE_SMOOTH_MM)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    # The affine stays fixed: the warp is optimised in template space, then composed under it.
    method.SetMovingInitialTransform(affine.transform)
    method.SetInitialTransform(bspline, inPlace=True)
    _watch(method, monitor, len(BSPLINE_SHRINK))
    with _threads(REGISTRATION_THREADS):
        try:
            method.Execute(fixed, sitk.Cast(moving, sitk.sitkFloat32))
        except RuntimeError as error:
            monitor.check()
            raise RegistrationError(f"deformable refinement failed: {str(error).splitlines()[-1]}") from None
    monitor.check()
    metric = method.GetMetricValue()
    if not np.isfinite(metric):
        raise RegistrationError("deformable refinement diverged")
    monitor.report("registration", 1.0)
    return Registration(sitk.CompositeTransform([affine.transform, bspline]), "affine+bspline", metric,
                        time.perf_counter() - start)


def _watch(method: sitk.ImageRegistrationMethod, monitor: Monitor, levels: int,
           span: tuple[float, float] = (0.0, 1.0)) -> None:
    """Progress per level over ``span`` of the registration, and cancellation."""
    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: monitor.report(
        "registration", span[0] + (span[1] - span[0]) * method.GetCurrentLevel() / levels))
    # An exception cannot cross SimpleITK's callback (it would come back as a RuntimeError): ask the
    # optimiser to stop instead; the caller raises Cancelled (monitor.check) once Execute has returned.
    method.AddCommand(sitk.sitkIterationEvent, lambda: method.Abort() if monitor.cancelled() else None)
