"""Location-aware scoring: a residual as a deviation from what healthy scans do at that place.

A model reconstructs some places (ventricle borders, sulci, the midline) a little worse on every
scan; a plain residual lights them up everywhere. A package may carry the per-voxel mean and
spread of healthy scans' residuals in model space (fitted by ``training.normative``); the anomaly
map is then the residual's deviation from them, in healthy spreads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import ModelPackageError

# Stored at every second voxel of the model grid: the maps are smooth, and packages stay small.
STORAGE_STRIDE = 2


@dataclass(frozen=True)
class NormativeStatistics:
    """Healthy residual mean and spread on the model grid, (z, y, x)."""

    mean: np.ndarray
    spread: np.ndarray

    def deviation(self, score: np.ndarray) -> np.ndarray:
        """Signed deviation of ``score`` from healthy scans at each location, in healthy spreads."""
        return ((score - self.mean) / self.spread).astype(np.float32)

    def to_tensors(self) -> dict[str, np.ndarray]:
        s = STORAGE_STRIDE
        return {"mean": np.ascontiguousarray(self.mean[::s, ::s, ::s], dtype=np.float32),
                "spread": np.ascontiguousarray(self.spread[::s, ::s, ::s], dtype=np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], shape: tuple[int, int, int],
                     source: str = "normative statistics") -> "NormativeStatistics":
        expected = tuple(-(-n // STORAGE_STRIDE) for n in shape)
        maps = {}
        for key in ("mean", "spread"):
            stored = tensors.get(key)
            if stored is None or tuple(stored.shape) != expected or not np.isfinite(stored).all():
                raise ModelPackageError(f"{source}: '{key}' must be finite numbers of shape {expected} "
                                        f"(the model grid {tuple(shape)} at every {STORAGE_STRIDE}nd voxel)")
            maps[key] = _upsample(stored.astype(np.float32), shape)
        if not (maps["spread"] > 0).all():
            raise ModelPackageError(f"{source}: 'spread' must be positive everywhere")
        return cls(maps["mean"], maps["spread"])


def _upsample(stored: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Linear interpolation back onto the full grid: voxel i of the grid is stored voxel i / stride."""
    coordinates = np.meshgrid(*(np.arange(n) / STORAGE_STRIDE for n in shape), indexing="ij")
    return ndimage.map_coordinates(stored, coordinates, order=1, mode="nearest").astype(np.float32)


def deviation_map(score: np.ndarray, scored: np.ndarray, statistics: NormativeStatistics,
                  scan_scaled: bool) -> np.ndarray:
    """The anomaly map: the deviation above healthy (0 below, and outside ``scored``).

    ``scan_scaled`` divides by the scan's own median absolute deviation over ``scored``: a scan
    noisier than the healthy ones then keeps the same false-positive rate (a lesion is too small
    a part of the brain to move a median)."""
    deviation = statistics.deviation(score)
    if scan_scaled and scored.any():
        deviation = deviation / max(float(np.median(np.abs(deviation[scored]))), 1e-3)
    return np.where(scored, np.maximum(deviation, 0.0), 0.0).astype(np.float32)


def read_statistics(path: Path, sha256: str, shape: tuple[int, int, int], model: str) -> NormativeStatistics:
    """Load a package's statistics file after checking its hash (safetensors: arrays only)."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.numpy import load as load_arrays

    if not path.is_file():
        raise ModelPackageError(f"model '{model}': normative statistics file {path.name} is missing")
    if path.stat().st_size > 64 << 20:
        raise ModelPackageError(f"model '{model}': normative statistics file {path.name} is larger than 64 MB")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise ModelPackageError(f"model '{model}': {path.name} does not match the SHA-256 in its card "
                                "(corrupted or tampered with); refusing to load it")
    try:
        tensors = load_arrays(blob)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ModelPackageError(f"model '{model}': {path.name} is not a safetensors file ({error})") from None
    return NormativeStatistics.from_tensors(tensors, shape, f"model '{model}': {path.name}")


def write_statistics(path: Path, statistics: NormativeStatistics) -> None:
    from safetensors.numpy import save as save_arrays

    path.write_bytes(save_arrays(statistics.to_tensors()))
