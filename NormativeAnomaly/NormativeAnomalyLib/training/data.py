"""Healthy training data in model space, batches and augmentation.

Healthy data comes either as volume files, which go through the same path into model space
as inference (registration unless already in template space, brain mask, percentile
normalisation), or as a population prebuilt by ``scripts/build_population.py`` (already
normalised model inputs). Patients' scans lend their healthy tissue too (``train_cases``): each
goes through a run's own path into model space (skull-stripped scans registered to the
template's brain and masked by their own), and its lesion label, dilated by a margin, is left
out of the loss. 2D models train on the axial slices that hold brain (the slices inference
reconstructs), 3D models on whole volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..model_space import prepare_model_input
from ..registration import identity_registration, register_to_template
from ..templates import Template
from ..volume_io import read_volume
from .scans import LESION_MARGIN_MM, LESION_SUFFIX, healthy_region, prepare_scan

# (normalised image, brain mask), both (z, y, x) on the template grid
HealthyVolume = tuple[np.ndarray, np.ndarray]
# A healthy volume and the voxels its loss counts (None: all of them)
TrainingVolume = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
# A 2D model learns little healthy tissue from a slice whose brain is mostly lesion and margin.
MAX_EXCLUDED_FRACTION = 0.5


def training_preprocessing(config: dict[str, Any], normalisation: dict) -> dict[str, Any]:
    """How the package being trained prepares inputs (its card's ``preprocessing``): patients' scans
    are prepared so too. N4 is off: the card's setting may be changed after training (fit_normative)."""
    return {"registration": config.get("registration", "affine"), "bias_correction": False,
            "normalisation": normalisation}


def load_lesion_cases(config: dict[str, Any], template: Template, normalisation: dict) -> list[TrainingVolume]:
    """The healthy tissue of patients' scans (``train_cases``: ``data`` folder, file ``suffix``,
    ``cases``, ``lesion_margin_mm``, ``repeat``): each scan with its lesion, dilated by the margin,
    out of the loss; listed ``repeat`` times so that a few real scans weigh against a population."""
    spec = config.get("train_cases")
    if not spec:
        return []
    folder, margin = Path(spec["data"]), float(spec.get("lesion_margin_mm", LESION_MARGIN_MM))
    preprocessing = training_preprocessing(config, normalisation)
    spacing_zyx = tuple(reversed(template.image.GetSpacing()))
    volumes: list[TrainingVolume] = []
    for case in spec["cases"]:
        label = folder / f"{case}{LESION_SUFFIX}"
        if not label.is_file():
            raise ValueError(f"train_cases: {case} has no lesion label {label.name} in {folder}; a patient's scan "
                             "teaches healthy tissue only with its lesion left out")
        image = read_volume(folder / f"{case}{spec['suffix']}", name=f"training case {case}")
        prepared, lesion, _ = prepare_scan(image, template, preprocessing, sitk.ReadImage(str(label), sitk.sitkUInt8))
        in_loss = healthy_region(np.ones_like(prepared.brain_mask), lesion, spacing_zyx, margin)
        volumes.append((prepared.image, prepared.brain_mask, in_loss))
    return volumes * int(spec.get("repeat", 1))


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


def _slices_kept(brain: np.ndarray, in_loss: np.ndarray | None) -> np.ndarray:
    """Axial slices with brain, and (where part of the loss is left out) mostly healthy brain."""
    area = brain.sum(axis=(1, 2))
    kept = area > 0
    if in_loss is not None:
        excluded = (brain & ~in_loss).sum(axis=(1, 2))
        kept &= excluded <= MAX_EXCLUDED_FRACTION * area
    return kept


def training_samples(volumes: list[HealthyVolume] | list[TrainingVolume], dims: int,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What batches are drawn from: brain slices (n, y, x) for 2D models, volumes (n, z, y, x) for 3D;
    and the voxels each one's loss counts (None: all of every sample)."""
    volumes = [(v[0], v[1], v[2] if len(v) > 2 else None) for v in volumes]
    partial = any(in_loss is not None for _, _, in_loss in volumes)
    if dims == 2:
        kept = [_slices_kept(brain, in_loss) for _, brain, in_loss in volumes]
        samples = np.concatenate([image[k] for (image, _, _), k in zip(volumes, kept)]).astype(np.float16)
        weights = (np.concatenate([(np.ones_like(image, bool) if in_loss is None else in_loss)[k]
                                   for (image, _, in_loss), k in zip(volumes, kept)]) if partial else None)
    else:
        samples = np.stack([image for image, _, _ in volumes]).astype(np.float16)
        weights = (np.stack([np.ones_like(image, bool) if in_loss is None else in_loss
                             for image, _, in_loss in volumes]) if partial else None)
    return torch.from_numpy(samples), None if weights is None else torch.from_numpy(weights)


def draw_batch(samples: torch.Tensor, batch_size: int, generator: torch.Generator,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random batch with a channel axis: (b, 1, *spatial), float32, augmented; and its loss weights."""
    index = torch.randint(len(samples), (batch_size,), generator=generator)
    batch = augment(samples[index][:, None].float(), generator)
    return batch, None if weights is None else weights[index][:, None].float()


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
