"""Training a slice-wise denoising autoencoder on healthy volumes and writing its package.

Config-driven (a plain dict, usually a JSON file under ``scripts/configs/``), seeded, with
resumable checkpoints. Healthy data comes either as volume files, which go through the same
path into model space as inference (registration unless already in template space, brain
mask, percentile normalisation), or as a population prebuilt by
``scripts/build_population.py`` (already normalised model inputs). The DAE learns to remove
coarse noise (Gaussian noise drawn at low resolution and upsampled; Kascenas et al. 2022).

Launched with ``torchrun --nproc_per_node N`` the same code trains with
DistributedDataParallel (gloo on CPU, NCCL on GPU): each process draws its own batches,
gradients are averaged, and process 0 writes checkpoints and the package.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .inference import reconstruct
from .model_space import prepare_model_input
from .models.networks import build_network
from .models.package import ModelPackage, write_package
from .registration import identity_registration, register_to_template
from .scoring import Calibration, anomaly_map, scoring_mask
from .templates import Template, load_template
from .volume_io import read_volume

DEFAULT_SCORING = {"residual": "absolute", "mask_erosion_mm": 2.0, "median_filter_voxels": 3,
                   "min_lesion_mm3": 50.0, "default_fpr": 0.01}
DEFAULT_NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}

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


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(config: dict[str, Any], rank: int) -> torch.device:
    requested = config.get("device", "cpu")
    if requested == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(requested)


def train_dae(config: dict[str, Any], progress: Callable[[int, float], None] | None = None) -> ModelPackage | None:
    """Train, calibrate and write a DAE package as ``config`` says; returns the loaded package
    (``None`` on processes other than 0 of a distributed run)."""
    rank, world = _distributed()
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)  # identical initial weights on every process
    generator = torch.Generator().manual_seed(seed + 7919 * rank)  # but different batches
    device = _device(config, rank)
    template = load_template(config["template"])
    normalisation = config.get("normalisation", DEFAULT_NORMALISATION)
    slices = torch.from_numpy(brain_slices(load_healthy(config, "train", template, normalisation)))
    network = build_network(config["network"]).to(device)
    model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network
    optimiser = torch.optim.Adam(network.parameters(), lr=float(config.get("learning_rate", 1e-3)))
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 16))
    noise = config.get("noise", {"resolution": 16, "std": 0.2})
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    start, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)  # our own file, tensors only
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
        if world == 1:
            generator.set_state(state["generator"])  # exact resume; processes > 1 draw fresh batches
        else:
            generator.manual_seed(seed + 7919 * rank + start)
    began = time.perf_counter()
    model.train()
    for step in range(start, steps):
        index = torch.randint(len(slices), (batch_size,), generator=generator)
        clean = augment(slices[index][:, None].float(), generator)
        noisy = clean + coarse_noise(clean.shape, noise["resolution"], noise["std"], generator) * (clean > 0)
        loss = F.mse_loss(model(noisy.to(device)), clean.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across processes here
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None and rank == 0:
            progress(step + 1, losses[-1])
        last = step + 1 == steps
        if checkpoint is not None and rank == 0 and ((step + 1) % int(config.get("checkpoint_every", 200)) == 0 or last):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"network": network.state_dict(), "optimiser": optimiser.state_dict(), "step": step + 1,
                        "generator": generator.get_state(), "losses": torch.tensor(losses)}, checkpoint)
    seconds = time.perf_counter() - began
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    network.eval()
    card = _card(config, template, normalisation, losses, seconds, world)
    state_dict = {key: value.cpu() for key, value in network.state_dict().items()}
    # Write uncalibrated first (a valid package), then calibrate with the very inference code users run.
    out = Path(config["out"])
    package = write_package(out, card, state_dict, overwrite=bool(config.get("overwrite", False)))
    calibration = calibrate(package, load_healthy(config, "calibration", template, normalisation), device)
    card["calibration"].update(fpr=list(calibration.fpr), threshold=list(calibration.threshold))
    (out / "losses.json").write_text(json.dumps(losses))
    plot_losses(losses, out / "training_loss.png", config["name"])
    return write_package(out, card, state_dict, overwrite=True)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(losses, color="0.7", linewidth=0.6, label="per step")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.semilogy(np.arange(window - 1, len(losses)), smooth, color="C0", label=f"mean of {window}")
    ax.set_xlabel("step"), ax.set_ylabel("MSE loss"), ax.set_title(title), ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _card(config: dict[str, Any], template: Template, normalisation: dict, losses: list[float],
          seconds: float, processes: int = 1) -> dict[str, Any]:
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
        "calibration": {"data": config.get("calibration_data") or _describe(config, "calibration"),
                        "fpr": [0.01, 0.5], "threshold": [1.0, 0.0]},
        "training": {"data": config.get("training_data") or _describe(config, "train"),
                     "steps": int(config["steps"]), "batch_size": int(config.get("batch_size", 16)),
                     "noise": config.get("noise", {"resolution": 16, "std": 0.2}), "seed": int(config.get("seed", 0)),
                     "seconds": round(seconds, 1), "processes": processes,
                     "final_loss": round(float(np.mean(losses[-20:])), 6) if losses else None,
                     "script": "scripts/train.py"},
        "license": config.get("license", "See the licences of the training data."),
    }


def _describe(config: dict[str, Any], split: str) -> str:
    parts = [str(p) for p in config.get(f"{split}_volumes", [])]
    if config.get(f"{split}_population"):
        parts.append(f"population {config[f'{split}_population']}")
    return ", ".join(parts)
