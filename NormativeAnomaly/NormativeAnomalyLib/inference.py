"""Inference: the pseudo-healthy reconstruction in model space.

2D models run slice by slice (axial slices of the template grid) in batches, 3D models on
the whole volume. Diffusion models noise and denoise (``diffusion``), optionally several
times for an uncertainty map. The device is chosen automatically (CUDA, then MPS, then CPU) unless
forced; on a GPU the pass runs under autocast (bf16 where supported, else fp16). Progress
is reported and cancellation checked between batches.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from .diffusion import reconstruct_batch, settings_with
from .errors import NormativeAnomalyError
from .models.package import ModelPackage
from .progress import Monitor

DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(requested: str = "auto") -> torch.device:
    if requested not in DEVICES:
        raise NormativeAnomalyError(f"unknown device '{requested}'; use one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise NormativeAnomalyError(f"device '{requested}' was asked for but is not available here; use --device cpu")
    return torch.device(requested)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "mps":
        return torch.autocast("mps", dtype=torch.float16)
    return nullcontext()


def _forward(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    output = network(batch)
    # VarAutoEncoder returns (reconstruction, mu, logvar, z); the reconstruction comes first.
    return output[0] if isinstance(output, (tuple, list)) else output


def reconstruct(package: ModelPackage, image: np.ndarray, brain_mask: np.ndarray, device: torch.device,
                monitor: Monitor | None = None, batch_size: int | None = None,
                diffusion: dict[str, Any] | None = None) -> np.ndarray | None:
    """Pseudo-healthy reconstruction of ``image`` (z, y, x, model units); ``None`` for the intensity baseline."""
    return reconstruct_with_uncertainty(package, image, brain_mask, device, monitor, batch_size, diffusion)[0]


def reconstruct_with_uncertainty(package: ModelPackage, image: np.ndarray, brain_mask: np.ndarray,
                                 device: torch.device, monitor: Monitor | None = None, batch_size: int | None = None,
                                 diffusion: dict[str, Any] | None = None
                                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(reconstruction, variance): the variance over several stochastic reconstructions for
    diffusion models run with ``samples`` > 1, else ``None``. ``diffusion`` overrides the
    card's diffusion settings (noise_level, steps, samples, noise)."""
    monitor = monitor or Monitor()
    if package.family == "intensity":
        monitor.report("inference", 1.0)
        return None, None
    network = package.build_network().to(device)
    if package.family == "ddpm":
        settings = diffusion_settings(package, diffusion)
        samples = int(settings["samples"])
        # Seeded: the same scan and settings give the same reconstruction on every run.
        generator = torch.Generator().manual_seed(int(settings.get("seed", 0)))

        def apply(batch: torch.Tensor) -> torch.Tensor:
            draws = torch.stack([reconstruct_batch(network, batch, settings, generator) for _ in range(samples)])
            return torch.cat([draws.mean(0), draws.var(0, unbiased=False)], dim=1)
    else:
        def apply(batch: torch.Tensor) -> torch.Tensor:
            return _forward(network, batch)
    reconstruction, variance = image.copy(), np.zeros_like(image)
    with torch.inference_mode(), _autocast(device):
        if package.card["dims"] == 3:
            output = apply(torch.from_numpy(image)[None, None].to(device))[0].float().cpu().numpy()
            reconstruction = output[0]
            variance = output[1] if output.shape[0] > 1 else variance
            monitor.report("inference", 1.0)
        else:
            slices = np.flatnonzero(brain_mask.any(axis=(1, 2)))  # slices without brain stay as they are
            size = batch_size or package.card["inference"]["batch_size"]
            for start in range(0, len(slices), size):
                monitor.check()
                index = slices[start:start + size]
                batch = torch.from_numpy(image[index])[:, None].to(device, non_blocking=True)
                output = apply(batch).float().cpu().numpy()
                reconstruction[index] = output[:, 0]
                if output.shape[1] > 1:
                    variance[index] = output[:, 1]
                monitor.report("inference", min(start + size, len(slices)) / max(len(slices), 1))
    reconstruction = np.where(brain_mask, reconstruction, 0.0).astype(np.float32)
    stochastic = package.family == "ddpm" and int(diffusion_settings(package, diffusion)["samples"]) > 1
    return reconstruction, (np.where(brain_mask, variance, 0.0).astype(np.float32) if stochastic else None)


def diffusion_settings(package: ModelPackage, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's diffusion settings with a run's overrides; a one-line error if they do not fit."""
    try:
        return settings_with(package.card["inference"].get("diffusion"), overrides)
    except ValueError as error:
        raise NormativeAnomalyError(f"model '{package.name}': {error}") from None
