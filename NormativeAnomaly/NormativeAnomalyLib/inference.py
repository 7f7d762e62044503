"""Inference: the pseudo-healthy reconstruction in model space.

2D models run slice by slice (axial slices of the template grid) in batches, 3D models on
the whole volume. Diffusion models noise and denoise (``diffusion``), optionally several
times for an uncertainty map. Progress is reported and cancellation checked between batches.

Device and precision (``device``): CUDA, then MPS, then the CPU unless forced; ``precision``
"auto" runs a GPU under autocast (bf16 where supported, else fp16) and the CPU in fp32.
On CUDA, when no batch size is given, the first batch (the card's size) measures its peak
memory and the rest run in batches sized to half the memory left. A batch that runs out of
memory is retried, same slices, at half the size; still out of memory one slice at a time,
the work moves to the CPU and goes on. Each such fallback is one line for the user
(``Monitor.notice``) and is kept in the result's ``DeviceUse`` for run.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from .device import (autocast, batch_size_from_memory, device_label, is_out_of_memory, peak_since,
                     release_cached_memory, resolve_precision, start_peak_measurement, to_device, usable_memory)
from .diffusion import reconstruct_batch, settings_with
from .errors import NormativeAnomalyError
from .model_space import ModelSpaceInput
from .models.package import ModelPackage
from .progress import Monitor

NetworkPass = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class DeviceUse:
    """How inference ran: the device that finished it, its precision and batch size, and the
    fallbacks on the way (one line each), so run.json states what really happened."""

    device: str
    precision: str
    batch_size: int | None = None  # slices per batch at the end (2D models); None for 3D and the baseline
    notices: list[str] = field(default_factory=list)


@dataclass
class Inference:
    reconstruction: np.ndarray | None  # None for the intensity baseline
    variance: np.ndarray | None  # diffusion models with samples > 1, else None
    use: DeviceUse


class _Placement:
    """The network on its device at its precision; moved to the CPU when the device runs out of memory."""

    def __init__(self, package: ModelPackage, device: torch.device, precision: str, monitor: Monitor) -> None:
        self.package, self.requested_precision, self.monitor = package, precision, monitor
        self.device, self.precision = device, resolve_precision(precision, device)
        self.network = package.build_network().to(device)
        self.notices: list[str] = []

    def notify(self, message: str) -> None:
        self.notices.append(message)
        self.monitor.notice(message)

    def move_to_cpu(self, what: str) -> None:
        """Rebuild the network on the CPU (its weights are in the package, on the host) and free the device."""
        if self.device.type == "cpu":
            raise NormativeAnomalyError(f"out of memory on the CPU even at {what}; close other programs and run again")
        before = self.device
        self.network = None
        release_cached_memory(before)
        self.device = torch.device("cpu")
        self.precision = resolve_precision(self.requested_precision, self.device)
        self.network = self.package.build_network()
        self.notify(f"{device_label(before)} out of memory even at {what}: finishing on the CPU ({self.precision})")

    def attempt(self, apply: NetworkPass, values: np.ndarray) -> np.ndarray | None:
        """One pass over ``values`` (n, 1, *spatial) on the host; None if the device ran out of memory."""
        try:
            with torch.inference_mode(), autocast(self.device, self.precision):
                return apply(self.network, to_device(values, self.device)).float().cpu().numpy()
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
        release_cached_memory(self.device)  # here, once the traceback (holding the batch) is gone
        return None


def _forward(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    output = network(batch)
    # VarAutoEncoder returns (reconstruction, mu, logvar, z); the reconstruction comes first.
    return output[0] if isinstance(output, (tuple, list)) else output


def _network_pass(package: ModelPackage,
                  diffusion: dict[str, Any] | None) -> tuple[NetworkPass, torch.Generator | None]:
    """The pass over one batch: output channel 0 the reconstruction, channel 1 (diffusion) the variance.

    Diffusion draws noise from a seeded host generator (returned, so a retried batch can
    restart from the same random state): the same scan and settings give the same
    reconstruction on every run and every device.
    """
    if package.family != "ddpm":
        return _forward, None
    settings = diffusion_settings(package, diffusion)
    samples = int(settings["samples"])
    generator = torch.Generator().manual_seed(int(settings.get("seed", 0)))

    def apply(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        draws = torch.stack([reconstruct_batch(network, batch, settings, generator) for _ in range(samples)])
        return torch.cat([draws.mean(0), draws.var(0, unbiased=False)], dim=1)
    return apply, generator


def reconstruct(package: ModelPackage, image: np.ndarray, brain_mask: np.ndarray, device: torch.device,
                monitor: Monitor | None = None, batch_size: int | None = None,
                diffusion: dict[str, Any] | None = None, precision: str = "auto") -> np.ndarray | None:
    """Pseudo-healthy reconstruction of ``image`` (z, y, x, model units); ``None`` for the intensity baseline."""
    return run_inference(package, image, brain_mask, device, monitor, batch_size, diffusion, precision).reconstruction


def run_inference(package: ModelPackage, image: np.ndarray, brain_mask: np.ndarray, device: torch.device,
                  monitor: Monitor | None = None, batch_size: int | None = None,
                  diffusion: dict[str, Any] | None = None, precision: str = "auto") -> Inference:
    """Reconstruction, variance (diffusion models run with ``samples`` > 1, else ``None``) and how it ran.

    ``batch_size``: slices per batch (2D); None: the card's, or on CUDA sized from free memory.
    ``diffusion`` overrides the card's diffusion settings (noise_level, steps, samples, noise).
    ``precision``: auto | fp32 | bf16 | fp16.
    """
    monitor = monitor or Monitor()
    if package.family == "intensity":
        monitor.report("inference", 1.0)
        return Inference(None, None, DeviceUse(device.type, resolve_precision(precision, device)))
    apply, generator = _network_pass(package, diffusion)
    placement = _Placement(package, device, precision, monitor)
    if package.card["dims"] == 3:
        output, size = _whole_volume(placement, apply, image), None
    else:
        output, size = _slice_batches(placement, apply, generator, image, brain_mask, monitor, batch_size)
    monitor.report("inference", 1.0)
    reconstruction = np.where(brain_mask, output[:, 0], 0.0).astype(np.float32)
    stochastic = package.family == "ddpm" and int(diffusion_settings(package, diffusion)["samples"]) > 1
    variance = np.where(brain_mask, output[:, 1], 0.0).astype(np.float32) if stochastic else None
    return Inference(reconstruction, variance, DeviceUse(placement.device.type, placement.precision, size,
                                                         placement.notices))


def run_on_model_input(package: ModelPackage, model_input: ModelSpaceInput, device: torch.device,
                       monitor: Monitor | None = None, batch_size: int | None = None,
                       diffusion: dict[str, Any] | None = None, precision: str = "auto") -> Inference:
    """``run_inference`` on what ``model_input`` gives the network (``ModelSpaceInput.network_input``: a
    crop within the template's brain around it), its outputs kept to the input's own brain."""
    image, network_mask = model_input.network_input()
    inference = run_inference(package, image, network_mask, device, monitor, batch_size, diffusion, precision)
    if model_input.network_image is None:
        return inference
    kept = [None if output is None else np.where(model_input.brain_mask, output, 0.0).astype(np.float32)
            for output in (inference.reconstruction, inference.variance)]
    return replace(inference, reconstruction=kept[0], variance=kept[1])


def _whole_volume(placement: _Placement, apply: NetworkPass, image: np.ndarray) -> np.ndarray:
    """A 3D model's pass, (z, channels, y, x); the volume cannot be split, so out of memory means the CPU."""
    while (output := placement.attempt(apply, image[None, None])) is None:
        placement.move_to_cpu("the whole volume (a 3D model)")
    return np.moveaxis(output[0], 0, 1)


def _slice_batches(placement: _Placement, apply: NetworkPass, generator: torch.Generator | None, image: np.ndarray,
                   brain_mask: np.ndarray, monitor: Monitor, batch_size: int | None) -> tuple[np.ndarray, int]:
    """A 2D model's passes over the slices holding brain, (z, channels, y, x); slices without brain stay the input."""
    output = np.zeros((image.shape[0], 2, *image.shape[1:]), dtype=np.float32)
    output[:, 0] = image
    slices = np.flatnonzero(brain_mask.any(axis=(1, 2)))
    card_size = batch_size or int(placement.package.card["inference"]["batch_size"])
    size, done = card_size, 0
    measure = batch_size is None and placement.device.type == "cuda"
    while done < len(slices):
        monitor.check()
        index = slices[done:done + size]
        random_state = generator.get_state() if generator is not None else None
        baseline = start_peak_measurement(placement.device) if measure else 0
        result = placement.attempt(apply, image[index][:, None])
        if result is None:
            if generator is not None:
                generator.set_state(random_state)  # the retried slices draw the noise they would have drawn
            if len(index) > 1:
                size = len(index) // 2
                placement.notify(f"{device_label(placement.device)} out of memory at {len(index)} slices per batch: "
                                 f"retrying with {size}")
            else:
                placement.move_to_cpu("1 slice per batch")
                size, measure = card_size, False  # host memory is not the card's: the card's batch size again
            continue
        output[index, :result.shape[1]] = result
        done += len(index)
        if measure and done < len(slices):
            per_slice = peak_since(placement.device, baseline) / len(index)
            size = batch_size_from_memory(usable_memory(placement.device), per_slice, limit=len(slices) - done)
            measure = False
        monitor.report("inference", done / max(len(slices), 1))
    return output, size


def diffusion_settings(package: ModelPackage, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's diffusion settings with a run's overrides; a one-line error if they do not fit."""
    try:
        return settings_with(package.card["inference"].get("diffusion"), overrides)
    except ValueError as error:
        raise NormativeAnomalyError(f"model '{package.name}': {error}") from None
