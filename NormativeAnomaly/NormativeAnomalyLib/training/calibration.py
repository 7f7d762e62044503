"""Calibration: thresholds as healthy false-positive rates, measured with the inference code users run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..inference import reconstruct
from ..models.package import ModelPackage, load_package, write_package
from ..scoring import Calibration, anomaly_map, scoring_mask
from .data import HealthyVolume, load_healthy


def calibrate(package_like: ModelPackage, volumes: list[HealthyVolume], device: torch.device) -> Calibration:
    """Calibration table from the package's own anomaly maps on held-out healthy volumes."""
    scores = []
    spacing_zyx = tuple(reversed(package_like.template.image.GetSpacing()))
    scoring = package_like.card["scoring"]
    for image, brain in volumes:
        reconstruction = reconstruct(package_like, image, brain, device)
        score = anomaly_map(image, reconstruction, brain, spacing_zyx, scoring)
        scores.append(score[scoring_mask(brain, spacing_zyx, scoring["mask_erosion_mm"])])
    return Calibration.from_healthy_scores(np.concatenate(scores))


def recalibrate(package_dir: Path, population: Path | None, volumes: list[str], description: str,
                device: str = "cpu", limit: int | None = None) -> Calibration:
    """Rewrite a package's calibration (only it) from other healthy data: a prepared population
    (scripts/build_population.py) or volumes, registered and prepared as at inference."""
    package = load_package(package_dir)
    config = {"calibration_population": str(population) if population else None, "calibration_volumes": volumes}
    healthy = load_healthy(config, "calibration", package.template, package.card["preprocessing"]["normalisation"])
    healthy = healthy[:limit] if limit else healthy  # slow models (diffusion): fewer volumes
    calibration = calibrate(package, healthy, torch.device(device))
    card = dict(package.card, calibration={"data": description, "fpr": list(calibration.fpr),
                                           "threshold": list(calibration.threshold)})
    write_package(package_dir, card, package.state_dict, overwrite=True)
    return calibration
