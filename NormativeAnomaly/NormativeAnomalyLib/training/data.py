"""Healthy training data in model space, batches and augmentation.

Healthy data comes either as volume files, which go through the same path into model space
as inference (registration unless already in template space, brain mask, percentile
normalisation), or as a population prebuilt by ``scripts/build_population.py`` (already
normalised model inputs). 2D models train on the axial slices that hold brain (the slices
inference reconstructs), 3D models on whole volumes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..model_space import prepare_model_input
from ..registration import identity_registration, register_to_template
from ..templates import Template
from ..volume_io import read_volume

# (normalised image, brain mask), both (z, y, x) on the template grid
HealthyVolume = tuple[np.ndarray, np.ndarray]


def load_healthy(config: dict[str, Any], split: str, template: Template, normalisation: dict) -> list[HealthyVolume]:
    """The ``split`` ("train" or "calibration") volumes: files from ``<split>_volumes`` and/or
    a prebuilt population array from ``<split>_population``."""
    volumes: list[HealthyVolume] = []
    registered = bool(config.get("registered", False))
    for path in config.get(f"{split}_volumes", []):
        image = read_volume(path, name="healthy volume")
        registration = identity_registration() if registered else register_to_template(image, template.image)
        prepared = prepare_model_input(image, template, registration, normalisation)
        volumes.append((prepared.image, prepared.brain_mask))
    if config.get(f"{split}_population"):
        population = np.load(config[f"{split}_population"], mmap_mode="r")
        brain = prepare_model_input(template.image, template, identity_registration(), normalisation).brain_mask
        volumes.extend((np.asarray(volume, dtype=np.float32), brain) for volume in population)
    if not volumes:
        raise ValueError(f"the training config names no {split} data ({split}_volumes or {split}_population)")
    return volumes


def brain_slices(volumes: list[HealthyVolume]) -> np.ndarray:
    """Axial slices with brain in them (the slices inference reconstructs), stacked as (n, y, x)."""
    kept = [image[brain.any(axis=(1, 2))] for image, brain in volumes]
    return np.concatenate(kept).astype(np.float16)


def training_samples(volumes: list[HealthyVolume], dims: int) -> torch.Tensor:
    """What batches are drawn from: brain slices (n, y, x) for 2D models, volumes (n, z, y, x) for 3D."""
    if dims == 2:
        return torch.from_numpy(brain_slices(volumes))
    return torch.from_numpy(np.stack([image for image, _ in volumes]).astype(np.float16))


def draw_batch(samples: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch with a channel axis: (b, 1, *spatial), float32, augmented."""
    index = torch.randint(len(samples), (batch_size,), generator=generator)
    return augment(samples[index][:, None].float(), generator)


def coarse_noise(shape: tuple[int, ...], resolution: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on a ``resolution``-sided grid and upsampled to ``shape`` (n, 1, y, x)."""
    low = torch.randn((shape[0], 1, resolution, resolution), generator=generator) * std
    return F.interpolate(low, size=shape[-2:], mode="bilinear", align_corners=False)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gamma and contrast, so the model does not learn one scanner's intensities."""
    per_sample = (batch.shape[0],) + (1,) * (batch.ndim - 1)
    gamma = torch.exp(torch.randn(per_sample, generator=generator) * 0.15)
    scale = 1.0 + torch.randn(per_sample, generator=generator) * 0.05
    inside = batch > 0
    return torch.where(inside, batch.clamp(min=0).pow(gamma) * scale, batch)
