"""A healthy training population from the few real anatomies that can be had offline.

Each anatomy is registered once to the model's template (as inference registers a scan),
then varied in model space the ways scans of healthy people vary: head position and shape
(random affine + smooth elastic warp, which also stands for registration error), tissue
contrast (a random monotone intensity curve, as between scanners and sequences), bias
field, thick slices (resolution loss along one axis), blur and Rician noise. The result is
normalised exactly as inference normalises, inside the template's brain mask, so the model
learns the inputs it will be given. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .model_space import prepare_model_input, to_model_space
from .registration import identity_registration, register_to_template
from .templates import Template
from .volume_io import read_volume


@dataclass(frozen=True)
class Anatomy:
    name: str
    image: np.ndarray  # (z, y, x) on the template grid, input intensity units, zero outside the field of view


def register_anatomy(name: str, path: str, template: Template, skull_stripped: bool,
                     already_in_template_space: bool = False) -> Anatomy:
    """Bring one anatomy onto the template grid. Skull-stripped images register to the template's brain."""
    image = read_volume(path, name=name)
    if already_in_template_space:
        registration = identity_registration()
    else:
        fixed = template.image
        if skull_stripped:
            fixed = sitk.Mask(sitk.Cast(template.image, sitk.sitkFloat32), template.brain_mask)
        registration = register_to_template(image, fixed, "affine")
    return Anatomy(name, sitk.GetArrayFromImage(to_model_space(image, template, registration)))


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / (np.abs(field).max() + 1e-8)


def spatial_variant(image: np.ndarray, rng: np.random.Generator, spacing: float, order: int = 1) -> np.ndarray:
    """Random affine (about the centre) plus a smooth elastic displacement, in voxel units."""
    shape = np.asarray(image.shape)
    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        plane = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[plane[0], plane[0]], r[plane[0], plane[1]], r[plane[1], plane[0]], r[plane[1], plane[1]] = c, -s, s, c
        rotation = rotation @ r
    matrix = rotation @ np.diag(rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-4, 4, 3) / spacing
    centre = (shape - 1) / 2
    grid = np.indices(image.shape, dtype=np.float32).reshape(3, -1)
    coordinates = matrix @ (grid - centre[:, None]) + centre[:, None] + shift[:, None]
    coarse = tuple(int(n) // 4 for n in shape)  # elastic field drawn coarse, upsampled: smooth and cheap
    for axis in range(3):
        magnitude = rng.uniform(0.5, 2.0) / spacing  # up to 2 mm
        field = _smooth_field(coarse, rng, 2.0) * magnitude
        coordinates[axis] += ndimage.zoom(field, shape / np.asarray(coarse), order=1).ravel()
    return ndimage.map_coordinates(image, coordinates, order=order, mode="constant").reshape(image.shape)


def _contrast(image: np.ndarray, inside: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random monotone curve through brain percentiles: tissue contrasts shift, their order is kept.
    Zero stays zero; above the last knot the curve continues with its last slope."""
    knots = np.concatenate([[0.0], np.percentile(image[inside], [5, 25, 50, 75, 99.5])])
    steps = np.diff(knots) * rng.uniform(0.75, 1.3, len(knots) - 1)
    targets = np.concatenate([[0.0], np.cumsum(steps)])
    curved = np.interp(image, knots, targets)
    above = image > knots[-1]
    curved[above] = targets[-1] + (image[above] - knots[-1]) * steps[-1] / max(knots[-1] - knots[-2], 1e-6)
    return curved.astype(np.float32)


def _thick_slices(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    axis, factor = int(rng.integers(3)), float(rng.uniform(1.5, 3.0))
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = factor / 2.355  # a slice profile of `factor` voxels FWHM
    blurred = ndimage.gaussian_filter(image, sigma)
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = 1 / factor
    small = ndimage.zoom(blurred, zoom, order=1)
    return ndimage.zoom(small, np.asarray(image.shape) / np.asarray(small.shape), order=1)


def augment(anatomy: np.ndarray, rng: np.random.Generator, spacing: float = 2.0) -> np.ndarray:
    """One healthy variant of ``anatomy`` (template grid, intensity units)."""
    image = spatial_variant(anatomy.astype(np.float32), rng, spacing)
    inside = image > np.percentile(image[image > 0], 5) if (image > 0).any() else image > 0
    image = _contrast(image, inside, rng)
    scale = np.percentile(image[inside], 99)
    bias = np.exp(0.15 * rng.uniform(0.3, 1.0) * _smooth_field(image.shape, rng, 20.0) / 0.5)
    image = image * bias
    if rng.random() < 0.5:
        image = _thick_slices(image, rng)
    if rng.random() < 0.3:
        image = ndimage.gaussian_filter(image, rng.uniform(0.3, 0.8))
    sigma = scale * rng.uniform(0.01, 0.05)
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return noisy.astype(np.float32)


def healthy_variants(anatomy: Anatomy, template: Template, count: int, seed: int,
                     normalisation: dict) -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised variants (n, z, y, x) float16 and the brain mask they share."""
    rng = np.random.default_rng(seed)
    volumes = []
    brain = None
    for _ in range(count):
        variant = sitk.GetImageFromArray(augment(anatomy.image, rng, template.image.GetSpacing()[0]))
        variant.CopyInformation(template.image)
        prepared = prepare_model_input(variant, template, identity_registration(), normalisation)
        volumes.append(prepared.image.astype(np.float16))
        brain = prepared.brain_mask
    return np.stack(volumes), brain
