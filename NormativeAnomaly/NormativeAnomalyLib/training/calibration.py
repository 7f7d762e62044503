"""Calibration: thresholds as healthy false-positive rates, measured with the inference code users run."""

from __future__ import annotations

import numpy as np
import torch

from ..inference import reconstruct
from ..models.package import ModelPackage
from ..scoring import Calibration, anomaly_map, scoring_mask
from .data import HealthyVolume


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
