"""Training a slice-wise denoising autoencoder on healthy volumes and writing its package.

Config-driven (a plain dict, usually a JSON file under ``scripts/configs/``), seeded, with
resumable checkpoints. The healthy volumes go through the same path into model space as
inference does (registration unless already in template space, brain mask, percentile
normalisation), so training and inference see identical inputs. The DAE learns to remove
coarse noise (Gaussian noise drawn at low resolution and upsampled; Kascenas et al. 2022).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .models.networks import build_network
from .models.package import ModelPackage, write_package
from .model_space import ModelSpaceInput, prepare_model_input
from .registration import identity_registration, register_to_template
from .scoring import Calibration, anomaly_map, scoring_mask
from .inference import reconstruct
from .templates import Template, load_template
from .volume_io import read_volume

DEFAULT_SCORING = {"residual": "absolute", "mask_erosion_mm": 2.0, "median_filter_voxels": 3,
                   "min_lesion_mm3": 50.0, "default_fpr": 0.01}
DEFAULT_NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}


def load_healthy(paths: list[str], template: Template, registered: bool,
                 normalisation: dict) -> list[ModelSpaceInput]:
    volumes = []
    for path in paths:
        image = read_volume(path, name="healthy volume")
        registration = identity_registration() if registered else register_to_template(image, template.image)
        volumes.append(prepare_model_input(image, template, registration, normalisation))
    return volumes


def brain_slices(volumes: list[ModelSpaceInput], min_brain_fraction: float = 0.0) -> np.ndarray:
    """Axial slices with brain in them (as inference sees them), stacked as (n, y, x)."""
    kept = []
    for volume in volumes:
        fraction = volume.brain_mask.mean(axis=(1, 2))
        kept.append(volume.image[(fraction > 0) & (fraction >= min_brain_fraction * fraction.max())])
    return np.concatenate(kept).astype(np.float32)


def coarse_noise(shape: tuple[int, ...], resolution: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on a ``resolution``-sided grid and upsampled to ``shape`` (n, 1, y, x)."""
    low = torch.randn((shape[0], 1, resolution, resolution), generator=generator) * std
    return F.interpolate(low, size=shape[-2:], mode="bilinear", align_corners=False)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gamma and contrast, so the model does not learn one scanner's intensities."""
    n = batch.shape[0]
    gamma = torch.exp(torch.randn((n, 1, 1, 1), generator=generator) * 0.15)
    scale = 1.0 + torch.randn((n, 1, 1, 1), generator=generator) * 0.05
    inside = batch > 0
    return torch.where(inside, batch.clamp(min=0).pow(gamma) * scale, batch)


def calibrate(package_like: ModelPackage, volumes: list[ModelSpaceInput], device: torch.device) -> Calibration:
    """Calibration table from the package's own anomaly maps on held-out healthy volumes."""
    scores = []
    spacing_zyx = tuple(reversed(package_like.template.image.GetSpacing()))
    for volume in volumes:
        reconstruction = reconstruct(package_like, volume.image, volume.brain_mask, device)
        score = anomaly_map(volume.image, reconstruction, volume.brain_mask, spacing_zyx, package_like.card["scoring"])
        scores.append(score[scoring_mask(volume.brain_mask, spacing_zyx, package_like.card["scoring"]["mask_erosion_mm"])])
    return Calibration.from_healthy_scores(np.concatenate(scores))


def train_dae(config: dict[str, Any], progress: Callable[[int, float], None] | None = None) -> ModelPackage:
    """Train, calibrate and write a DAE package as ``config`` says; returns the loaded package."""
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(config.get("device", "cpu"))
    template = load_template(config["template"])
    normalisation = config.get("normalisation", DEFAULT_NORMALISATION)
    registered = bool(config.get("registered", False))
    slices = torch.from_numpy(brain_slices(load_healthy(config["train_volumes"], template, registered, normalisation)))
    network = build_network(config["network"]).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=float(config.get("learning_rate", 1e-3)))
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 16))
    noise = config.get("noise", {"resolution": 16, "std": 0.2})
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    start, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)  # our own file, tensors only
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
    began = time.perf_counter()
    network.train()
    for step in range(start, steps):
        index = torch.randint(len(slices), (batch_size,), generator=generator)
        clean = augment(slices[index][:, None], generator)
        noisy = clean + coarse_noise(clean.shape, noise["resolution"], noise["std"], generator) * (clean > 0)
        loss = F.mse_loss(network(noisy.to(device)), clean.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
        if checkpoint is not None and ((step + 1) % int(config.get("checkpoint_every", 200)) == 0 or step + 1 == steps):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"network": network.state_dict(), "optimiser": optimiser.state_dict(), "step": step + 1,
                        "generator": generator.get_state(), "losses": torch.tensor(losses)}, checkpoint)
    network.eval()
    card = _card(config, template, normalisation, losses, time.perf_counter() - began)
    state_dict = {key: value.cpu() for key, value in network.state_dict().items()}
    # Write uncalibrated first (a valid package), then calibrate with the very inference code users run.
    out = Path(config["out"])
    package = write_package(out, card, state_dict, overwrite=bool(config.get("overwrite", False)))
    held_out = load_healthy(config["calibration_volumes"], template, registered, normalisation)
    calibration = calibrate(package, held_out, device)
    card["calibration"].update(fpr=list(calibration.fpr), threshold=list(calibration.threshold))
    (out / "losses.json").write_text(json.dumps(losses))
    return write_package(out, card, state_dict, overwrite=True)


def _card(config: dict[str, Any], template: Template, normalisation: dict, losses: list[float],
          seconds: float) -> dict[str, Any]:
    size = list(template.image.GetSize())
    spacing = [round(s, 6) for s in template.image.GetSpacing()]
    return {
        "format_version": 1, "name": config["name"], "version": config.get("version", "0.1.0"), "family": "dae",
        "description": config.get("description", "Slice-wise denoising autoencoder (coarse-noise DAE)."),
        "modality": config.get("modality", "T1"), "dims": 2, "template": {"name": template.name},
        "grid": {"size": size, "spacing": spacing},
        "preprocessing": {"registration": config.get("registration", "affine"), "bias_correction": False,
                          "normalisation": normalisation},
        "network": config["network"], "weights": None,
        "inference": {"batch_size": int(config.get("inference_batch_size", 16))},
        "scoring": config.get("scoring", DEFAULT_SCORING),
        "calibration": {"data": config.get("calibration_data", ", ".join(map(str, config["calibration_volumes"]))),
                        "fpr": [0.01, 0.5], "threshold": [1.0, 0.0]},
        "training": {"data": config.get("training_data", ", ".join(map(str, config["train_volumes"]))),
                     "steps": int(config["steps"]), "batch_size": int(config.get("batch_size", 16)),
                     "noise": config.get("noise", {"resolution": 16, "std": 0.2}), "seed": int(config.get("seed", 0)),
                     "seconds": round(seconds, 1), "final_loss": round(float(np.mean(losses[-20:])), 6) if losses else None,
                     "script": "scripts/train.py"},
        "license": config.get("license", "See the licences of the training data."),
    }
