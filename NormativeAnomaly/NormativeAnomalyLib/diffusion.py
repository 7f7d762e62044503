"""Denoising diffusion as a normative model (AnoDDPM, Wyatt et al. 2022; pDDPM, Behrendt et al. 2023; THOR).

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

Two card-only switches change the sampling: ``harmonise`` (THOR, Bercea et al. 2024: tissue the
model keeps close to the input is pulled back to it after each step) and ``patch_grid`` (pDDPM:
one tile of the slice noised and restored at a time, the rest its clean context).

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
# THOR's departure map is averaged over this many voxels a side, so that noise alone does not decide
HARMONISE_SMOOTHING = 5


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


def _tiles(shape: tuple[int, ...], grid: int) -> list[tuple[slice, ...]]:
    """The ``grid`` x ``grid`` tiles over the last two axes of ``shape`` (n, c, ..., y, x)."""
    edges = [[round(k * size / grid) for k in range(grid + 1)] for size in shape[-2:]]
    lead = (slice(None),) * (len(shape) - 2)
    return [lead + (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
            for ys, xs in [edges] for i in range(grid) for j in range(grid)]


def _harmonised(sample: torch.Tensor, estimate: torch.Tensor, clean: torch.Tensor, noised_input: torch.Tensor,
                scale: float) -> torch.Tensor:
    """THOR (Bercea et al. 2024): where the x0 estimate keeps to the input (its smoothed departure under
    ``scale``, in diffusion units), the sample is pulled towards the input noised to the same step, in
    proportion, so healthy tissue ends close to the input and only what the model changes stays changed."""
    departure = (estimate - clean).abs()
    pool = getattr(F, f"avg_pool{departure.ndim - 2}d")
    departure = pool(departure, kernel_size=HARMONISE_SMOOTHING, stride=1, padding=HARMONISE_SMOOTHING // 2,
                     count_include_pad=False)
    weight = (departure / scale).clamp(0.0, 1.0)
    return weight * sample + (1.0 - weight) * noised_input


def _denoise(network: torch.nn.Module, ddim, clean: torch.Tensor, noise: torch.Tensor, timesteps: list[int],
             settings: dict[str, Any], noised: torch.Tensor) -> torch.Tensor:
    """From x_t back to the x0 estimate (diffusion units); ``noised``: where the noise is (1) or the clean
    input is kept as context at every step (0)."""
    start = torch.full((clean.shape[0],), timesteps[0], dtype=torch.long, device=clean.device)
    sample = noised * ddim.add_noise(clean, noise, start) + (1.0 - noised) * clean
    # THOR's scale, from model units to diffusion units (0: off)
    scale = float(settings["harmonise"]) * 2.0 / (INPUT_RANGE[1] - INPUT_RANGE[0])
    if int(settings["steps"]) == 1:  # one-step x0 prediction
        alpha_bar = ddim.alphas_cumprod.to(clean.device)[timesteps[0]]
        epsilon = network(sample, timesteps=start)
        estimate = (sample - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()
    else:
        for k, t in enumerate(timesteps):
            epsilon = network(sample, timesteps=torch.full_like(start, t))
            sample, estimate = ddim.step(epsilon, t, sample)
            if scale > 0 and k + 1 < len(timesteps):
                following = torch.full_like(start, timesteps[k + 1])
                sample = _harmonised(sample, estimate, clean, ddim.add_noise(clean, noise, following), scale)
            sample = noised * sample + (1.0 - noised) * clean
        estimate = sample
    if scale > 0:
        estimate = _harmonised(estimate, estimate, clean, clean, scale)
    return estimate


def reconstruct_batch(network: torch.nn.Module, x0: torch.Tensor, settings: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One stochastic pseudo-healthy reconstruction of a batch (n, 1, *spatial), in model units.

    ``patch_grid`` > 1 (pDDPM, Behrendt et al. 2023): one tile of the grid is noised and restored at a
    time with the rest of the slice clean around it, so the model restores a region from its healthy
    context; the tiles' restorations are put together. One noise field serves all tiles.
    """
    ddim = scheduler(settings)
    clean = to_diffusion_range(x0)
    timesteps = _timesteps(ddim, settings)
    noise = structured_noise(tuple(clean.shape), settings["noise"], generator, clean.device).to(clean.dtype)
    grid = int(settings["patch_grid"])
    if grid == 1:
        estimate = _denoise(network, ddim, clean, noise, timesteps, settings, torch.ones_like(clean))
    else:
        estimate = torch.empty_like(clean)
        for tile in _tiles(tuple(clean.shape), grid):
            noised = torch.zeros_like(clean)
            noised[tile] = 1.0
            estimate[tile] = _denoise(network, ddim, clean, noise, timesteps, settings, noised)[tile]
    return from_diffusion_range(estimate.clamp(-1.0, 1.0))
