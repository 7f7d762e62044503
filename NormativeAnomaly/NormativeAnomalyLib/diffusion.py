"""Denoising diffusion as a normative model (AnoDDPM, Wyatt et al. 2022; pDDPM, Behrendt et al. 2023).

A DDPM trained on healthy slices cannot reproduce what it never saw. The scan is noised
part of the way (``noise_level`` of the ``train_timesteps`` forward steps: enough to drown a
lesion, not the anatomy around it), then denoised back to t = 0 with a few DDIM steps, or in
one step from the network's x0 prediction (``steps``: 1). The result is the pseudo-healthy
reconstruction. Each run draws new noise, so several ``samples`` give a mean reconstruction
and a per-voxel variance: an uncertainty map.

Noise: "gaussian" (white), "simplex" (multi-octave simplex noise, as AnoDDPM: low
frequencies hide large lesions better than white noise; ``simplex_noise``) or "coarse" (a
Gaussian field drawn at 1/8 resolution and upsampled: a cheaper, blockier stand-in for simplex
noise). A model is run with the noise it was trained with (its card's); another kind is allowed
as an experiment.

Settings live in the card (``inference.diffusion``) and can be overridden per run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .options import DIFFUSION_DEFAULTS, DIFFUSION_NOISE_KINDS, checked_diffusion
from .simplex_noise import simplex_noise

# Model inputs are normalised to [0, 1.5] (background 0); diffusion works on [-1, 1].
INPUT_RANGE = (0.0, 1.5)


def to_diffusion_range(x: torch.Tensor) -> torch.Tensor:
    low, high = INPUT_RANGE
    return (x - low) * (2.0 / (high - low)) - 1.0


def from_diffusion_range(x: torch.Tensor) -> torch.Tensor:
    low, high = INPUT_RANGE
    return (x + 1.0) * ((high - low) / 2.0) + low


def structured_noise(shape: tuple[int, ...], kind: str, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit-variance noise of ``shape`` (n, c, *spatial): white, simplex, or a smooth coarse field."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator).to(device)
    if kind == "simplex":
        return simplex_noise(shape, generator).to(device)
    if kind != "coarse":
        raise ValueError(f"unknown diffusion noise {kind!r}; use one of {', '.join(DIFFUSION_NOISE_KINDS)}")
    spatial = shape[2:]
    low = torch.randn((*shape[:2], *(max(2, s // 8) for s in spatial)), generator=generator)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    field = F.interpolate(low, size=spatial, mode=mode, align_corners=False)
    field = (field - field.mean(dim=tuple(range(2, field.ndim)), keepdim=True))
    field = field / field.std(dim=tuple(range(2, field.ndim)), keepdim=True).clamp(min=1e-6)
    return field.to(device)


def settings_with(card_settings: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's diffusion settings (DIFFUSION_DEFAULTS for what it lacks) with a run's overrides
    (None values ignored), checked (options.checked_diffusion)."""
    return {**DIFFUSION_DEFAULTS, **(card_settings or {}), **checked_diffusion(overrides, card_settings)}


def scheduler(settings: dict[str, Any]):
    """MONAI's DDIM scheduler for the card's noise schedule (the training's DDPM schedule)."""
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=int(settings["train_timesteps"]), schedule=settings["schedule"],
                         clip_sample=False, beta_start=float(settings["beta_start"]),
                         beta_end=float(settings["beta_end"]))


def _timesteps(ddim, settings: dict[str, Any]) -> list[int]:
    """``steps`` DDIM timesteps from about ``noise_level`` down to 0."""
    total, level, steps = int(settings["train_timesteps"]), int(settings["noise_level"]), int(settings["steps"])
    ddim.set_timesteps(min(total, max(steps, round(steps * total / level))))
    chosen = [int(t) for t in ddim.timesteps if int(t) <= level]
    return chosen[-steps:] if chosen else [0]


def reconstruct_batch(network: torch.nn.Module, x0: torch.Tensor, settings: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One stochastic pseudo-healthy reconstruction of a batch (n, 1, *spatial), in model units."""
    ddim = scheduler(settings)
    clean = to_diffusion_range(x0)
    timesteps = _timesteps(ddim, settings)
    start = torch.full((clean.shape[0],), timesteps[0], dtype=torch.long, device=clean.device)
    noise = structured_noise(tuple(clean.shape), settings["noise"], generator, clean.device).to(clean.dtype)
    sample = ddim.add_noise(clean, noise, start)
    if int(settings["steps"]) == 1:  # one-step x0 prediction
        alpha_bar = ddim.alphas_cumprod.to(clean.device)[timesteps[0]]
        epsilon = network(sample, timesteps=start)
        estimate = (sample - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()
    else:
        for t in timesteps:
            epsilon = network(sample, timesteps=torch.full_like(start, t))
            sample, estimate = ddim.step(epsilon, t, sample)
        estimate = sample
    return from_diffusion_range(estimate.clamp(-1.0, 1.0))
