"""Simulated lesions with exact masks, for the demo case, evaluation and teaching.

A mass pushes the surrounding tissue aside (a smooth radial displacement field, so it is
not only painted on) and replaces the tissue inside an irregular boundary with a lesion
of a given relative contrast. Only voxels inside the returned mask change intensity
beyond the displacement, which is what makes the mask exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import SimpleITK as sitk


@dataclass(frozen=True)
class SimulatedLesion:
    image: np.ndarray  # (z, y, x), the scan with the lesion
    displaced: np.ndarray  # the scan with the mass effect only (no intensity change)
    mask: np.ndarray  # bool, the lesion
    centre_zyx: tuple[int, int, int]


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma_voxels: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_voxels)
    return noise / (noise.std() + 1e-8)


def pick_centre(brain_mask: np.ndarray, spacing_zyx: tuple[float, ...], margin_mm: float,
                rng: np.random.Generator) -> tuple[int, int, int]:
    """A random voxel at least ``margin_mm`` inside the brain."""
    depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing_zyx)
    candidates = np.argwhere(depth > margin_mm)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max())
    return tuple(int(v) for v in candidates[rng.integers(len(candidates))])


def simulate_mass(image: np.ndarray, brain_mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                  rng: np.random.Generator, *, radius_mm: float = 12.0, contrast: float = -0.45,
                  mass_effect_mm: float = 3.0, irregularity: float = 0.25,
                  centre_zyx: tuple[int, int, int] | None = None) -> SimulatedLesion:
    """Insert a mass of relative ``contrast`` (-0.45: 45% darker than the tissue it replaces)."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if centre_zyx is None:
        centre_zyx = pick_centre(brain_mask, spacing_zyx, radius_mm * 1.3 + mass_effect_mm, rng)
    grid = np.indices(image.shape, dtype=np.float32)
    offset_mm = [(grid[a] - centre_zyx[a]) * spacing[a] for a in range(3)]
    distance = np.sqrt(sum(o * o for o in offset_mm)) + 1e-6

    # Mass effect: tissue at distance d moves outward by push * min(d/R, (R/d)^2); sample the
    # original at x - u(x). Decays with the square of distance, like a growing sphere.
    radius = radius_mm
    magnitude = mass_effect_mm * np.minimum(distance / radius, (radius / distance) ** 2)
    coordinates = [grid[a] - magnitude * offset_mm[a] / distance / spacing[a] for a in range(3)]
    displaced = ndimage.map_coordinates(image, coordinates, order=1, mode="nearest").astype(np.float32)
    displaced_brain = ndimage.map_coordinates(brain_mask.astype(np.float32), coordinates, order=1) > 0.5

    # Irregular boundary: the radius modulated by smooth noise, kept inside the brain.
    wobble = _smooth_noise(image.shape, rng, sigma_voxels=radius_mm / spacing.mean() / 2)
    mask = (distance < radius * (1.0 + irregularity * wobble)) & displaced_brain
    mask = ndimage.binary_opening(mask, iterations=1) & displaced_brain
    if not mask.any():
        raise ValueError("the simulated lesion fell outside the brain; pick another centre")

    # Lesion intensity: the replaced tissue's mean scaled by (1 + contrast), with texture,
    # blended towards the tissue near the border (weight >= 0.6, so every mask voxel changes).
    tissue = float(displaced[mask].mean())
    texture = 1.0 + 0.06 * _smooth_noise(image.shape, rng, sigma_voxels=1.0)
    lesion_value = tissue * (1.0 + contrast) * texture
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    weight = 0.6 + 0.4 * np.clip(depth / max(radius * 0.4, 1e-3), 0.0, 1.0)
    result = displaced.copy()
    result[mask] = (1 - weight[mask]) * displaced[mask] + weight[mask] * lesion_value[mask]
    return SimulatedLesion(result.astype(np.float32), displaced, mask, tuple(centre_zyx))


def simulate_multifocal(image: np.ndarray, brain_mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                        rng: np.random.Generator, *, count: int = 6, radius_mm: tuple[float, float] = (1.5, 3.5),
                        contrast: float = -0.35) -> SimulatedLesion:
    """Small lesions next to the ventricles (MS-like; T1 'black holes' by default), no mass effect.

    Ventricles are found as the dark voxels deep in the brain; lesion centres lie 2-8 mm from them
    in brighter (white-matter-like) tissue.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing_zyx)
    inside = brain_mask & (depth > 15.0)
    ventricles = inside & (image < np.percentile(image[brain_mask], 12))
    if ventricles.sum() < 10:
        ventricles = inside & (image < np.percentile(image[inside], 10))
    to_ventricle = ndimage.distance_transform_edt(~ventricles, sampling=spacing_zyx)
    candidates = np.argwhere((to_ventricle > 2) & (to_ventricle < 8) & inside
                             & (image > np.percentile(image[brain_mask], 55)))
    if len(candidates) == 0:
        candidates = np.argwhere(inside)
    result, mask = image.astype(np.float32).copy(), np.zeros(image.shape, bool)
    grid = np.indices(image.shape, dtype=np.float32)
    for _ in range(count):
        centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(*radius_mm)
        lo = np.maximum(centre - np.ceil(radius * 1.6 / spacing).astype(int) - 1, 0)
        hi = np.minimum(centre + np.ceil(radius * 1.6 / spacing).astype(int) + 2, image.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        # An ellipsoid elongated along a random direction (periventricular lesions are ovoid).
        axes = radius * rng.uniform(0.7, 1.5, 3)
        distance = sum(((grid[a][box] - centre[a]) * spacing[a] / axes[a]) ** 2 for a in range(3))
        blob = (distance < 1.0) & brain_mask[box]
        mask[box] |= blob
    texture = 1.0 + 0.05 * _smooth_noise(image.shape, rng, sigma_voxels=1.0)
    result[mask] = image[mask] * (1.0 + contrast) * texture[mask]
    return SimulatedLesion(result, image.astype(np.float32), mask, tuple(int(v) for v in candidates[0]))


def simulate_territorial(image: np.ndarray, brain_mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                         rng: np.random.Generator, *, radius_mm: float = 28.0,
                         contrast: float = -0.4) -> SimulatedLesion:
    """A large stroke-like lesion: a ball centred near the cortex, cut to the brain and to one hemisphere."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing_zyx)
    candidates = np.argwhere(brain_mask & (depth > 6) & (depth < 12))
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(image.shape, dtype=np.float32)
    distance = np.sqrt(sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    wobble = _smooth_noise(image.shape, rng, sigma_voxels=radius_mm / spacing.mean() / 3)
    midline = np.argwhere(brain_mask)[:, 2].mean()  # x (last axis) centre of the brain
    same_side = (grid[2] < midline) == (centre[2] < midline)
    mask = (distance < radius_mm * (1.0 + 0.2 * wobble)) & brain_mask & same_side
    texture = 1.0 + 0.05 * _smooth_noise(image.shape, rng, sigma_voxels=1.0)
    result = image.astype(np.float32).copy()
    result[mask] = image[mask] * (1.0 + contrast) * texture[mask]
    return SimulatedLesion(result, image.astype(np.float32), mask, tuple(int(v) for v in centre))


LESION_KINDS = ("hypointense", "hyperintense", "isointense", "multifocal", "territorial")


def simulate_lesion(kind: str, image: np.ndarray, brain_mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                    rng: np.random.Generator) -> SimulatedLesion:
    """A lesion of ``kind`` with size, contrast and location drawn from ``rng``."""
    if kind == "hypointense":
        return simulate_mass(image, brain_mask, spacing_zyx, rng, radius_mm=rng.uniform(6, 16),
                             contrast=-rng.uniform(0.25, 0.6), mass_effect_mm=rng.uniform(1, 4))
    if kind == "hyperintense":
        return simulate_mass(image, brain_mask, spacing_zyx, rng, radius_mm=rng.uniform(6, 16),
                             contrast=rng.uniform(0.25, 0.6), mass_effect_mm=rng.uniform(1, 4))
    if kind == "isointense":
        return simulate_mass(image, brain_mask, spacing_zyx, rng, radius_mm=rng.uniform(10, 18), contrast=0.0,
                             mass_effect_mm=rng.uniform(3, 6))
    if kind == "multifocal":
        return simulate_multifocal(image, brain_mask, spacing_zyx, rng, count=int(rng.integers(4, 10)),
                                   contrast=-rng.uniform(0.2, 0.45))
    if kind == "territorial":
        return simulate_territorial(image, brain_mask, spacing_zyx, rng, radius_mm=rng.uniform(20, 35),
                                    contrast=-rng.uniform(0.25, 0.5))
    raise ValueError(f"unknown lesion kind {kind!r}; use one of {', '.join(LESION_KINDS)}")


def chest_phantom(seed: int = 0) -> "sitk.Image":
    """A chest-CT-like volume in Hounsfield units (body, two lungs, heart, spine; 1.2x1.2x5 mm):
    non-brain anatomy for checking that registration failure is caught. No real chest CT ships
    in a package this project can fetch, hence a phantom."""
    import SimpleITK as sitk

    z, y, x = np.mgrid[0:80, 0:200, 0:300].astype(np.float32)
    values = np.where(((x - 150) / 130) ** 2 + ((y - 100) / 85) ** 2 < 1, 40.0, -1000.0)
    for centre_x in (95, 205):
        values[((x - centre_x) / 45) ** 2 + ((y - 95) / 55) ** 2 < 1] = -850.0
    values[((x - 160) / 35) ** 2 + ((y - 80) / 30) ** 2 < 1] = 50.0
    values[((x - 150) / 18) ** 2 + ((y - 160) / 18) ** 2 < 1] = 700.0
    values += np.random.default_rng(seed).normal(0.0, 20.0, values.shape)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.2, 1.2, 5.0))
    return image
