"""Inference: the pseudo-healthy reconstruction in model space.

2D models run slice by slice (axial slices of the template grid) in batches, 3D models on
the whole volume. The device is chosen automatically (CUDA, then MPS, then CPU) unless
forced; on a GPU the pass runs under autocast (bf16 where supported, else fp16). Progress
is reported and cancellation checked between batches.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from .errors import ModelPackageError, NormativeAnomalyError
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
                monitor: Monitor | None = None, batch_size: int | None = None) -> np.ndarray | None:
    """Pseudo-healthy reconstruction of ``image`` (z, y, x, model units); ``None`` for the intensity baseline."""
    monitor = monitor or Monitor()
    if package.family == "intensity":
        monitor.report("inference", 1.0)
        return None
    if package.family == "ddpm":
        raise ModelPackageError(f"model '{package.name}': the diffusion family is not supported by this version")
    network = package.build_network().to(device)
    reconstruction = image.copy()
    with torch.inference_mode(), _autocast(device):
        if package.card["dims"] == 3:
            volume = torch.from_numpy(image)[None, None].to(device)
            reconstruction = _forward(network, volume)[0, 0].float().cpu().numpy()
            monitor.report("inference", 1.0)
        else:
            slices = np.flatnonzero(brain_mask.any(axis=(1, 2)))  # slices without brain stay as they are
            size = batch_size or package.card["inference"]["batch_size"]
            for start in range(0, len(slices), size):
                monitor.check()
                index = slices[start:start + size]
                batch = torch.from_numpy(image[index])[:, None].to(device, non_blocking=True)
                reconstruction[index] = _forward(network, batch)[:, 0].float().cpu().numpy()
                monitor.report("inference", min(start + size, len(slices)) / max(len(slices), 1))
    return np.where(brain_mask, reconstruction, 0.0).astype(np.float32)
