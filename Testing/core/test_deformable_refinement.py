"""The B-spline refinement after the affine undoes a smooth warp, the same way on every run."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.registration import Registration, refine_deformable


def phantom(size: int = 40, spacing: float = 2.0) -> sitk.Image:
    """A head-like blob: a bright ellipsoid with a darker core and an off-centre spot (2 mm voxels)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    outer = (x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.6) ** 2
    values = 100.0 * (outer < 1) - 40.0 * (outer < 0.3) + 60.0 * ((x - 0.3) ** 2 + (y + 0.2) ** 2 + z ** 2 < 0.04)
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(values.astype(np.float32)), 1.0)
    image.SetSpacing([spacing] * 3)
    return image


def warped(image: sitk.Image) -> sitk.Image:
    """``image`` under a smooth displacement of up to 4 mm (a few control-point spacings long)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    field = np.zeros((*size[::-1], 3))
    z, y, x = np.meshgrid(*[np.arange(n) * spacing[0] for n in size[::-1]], indexing="ij")
    extent = size[0] * spacing[0]
    field[..., 0] = 4.0 * np.sin(2 * np.pi * y / extent)  # x shifts with y
    field[..., 1] = 3.0 * np.cos(2 * np.pi * z / extent)  # y shifts with z
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(image)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0)


def shifted(image: sitk.Image, shift_mm: tuple[float, float, float]) -> tuple[sitk.Image, Registration]:
    """``image`` moved by ``shift_mm``, and the exact affine that brings it back (template -> input points)."""
    translation = sitk.TranslationTransform(3, shift_mm)
    affine = sitk.AffineTransform(3)
    affine.SetTranslation(shift_mm)
    return sitk.Resample(image, image, translation.GetInverse(), sitk.sitkLinear, 0.0), \
        Registration(affine, "affine", float("nan"), 0.0)


def mean_squared_difference(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    return float(np.mean((sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(fixed)) ** 2))


def test_refinement_undoes_a_smooth_warp_deterministically():
    template = phantom()
    # Warped, then shifted: the affine (given exactly) undoes the shift, the B-spline must undo the
    # warp in template space, under the affine (a composite in the wrong order misplaces it:
    # 0.4 of the squared difference left instead of 0.16).
    moving, affine = shifted(warped(template), (10.0, -8.0, 4.0))
    first = refine_deformable(moving, template, affine, control_spacing_mm=20.0)
    second = refine_deformable(moving, template, affine, control_spacing_mm=20.0)
    assert first.kind == "affine+bspline" and np.isfinite(first.metric)
    before = mean_squared_difference(template, moving, affine.transform)
    after = mean_squared_difference(template, moving, first.transform)
    assert after < 0.3 * before, f"mean squared difference {before:.1f} -> {after:.1f}"
    # Same seed, one thread: the same control points to the last bit.
    parameters = [sitk.CompositeTransform(r.transform).GetNthTransform(1).GetParameters() for r in (first, second)]
    assert parameters[0] == parameters[1]
