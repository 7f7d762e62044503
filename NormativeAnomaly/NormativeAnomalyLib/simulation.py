"""Simulated lesions with exact masks, for the demo case, evaluation and teaching.

A mass pushes the surrounding tissue aside (a smooth radial displacement field, so it is
not only painted on) and replaces the tissue inside an irregular boundary with a lesion
of a given relative contrast. Only voxels inside the returned mask change intensity
beyond the displacement, which is what makes the mask exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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
