"""Simplex noise (Perlin 2001; the sampling scheme of Gustavson's "Simplex noise demystified"),
vectorised in torch, summed over octaves as AnoDDPM (Wyatt et al. 2022) does.

AnoDDPM's point: white Gaussian noise is too fine to hide a large lesion, so a diffusion model
trained and run with it reconstructs the lesion. Simplex noise has energy at every scale up to
the coarsest octave, so partial noising can drown a tumour while the anatomy around it, which
the model knows, comes back. 2D slices are cut from a 3D noise field at a random depth, so
every slice of a batch gets its own pattern.
"""

from __future__ import annotations

import torch

# The 12 edge midpoints of a cube: the gradient set of 3D simplex noise.
_GRADIENTS = torch.tensor([[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
                           [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
                          dtype=torch.float32)
_SKEW, _UNSKEW = 1.0 / 3.0, 1.0 / 6.0
# 32 maps the sum of the four corner contributions of 3D simplex noise into about [-1, 1].
_SCALE = 32.0


def simplex3d(points: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Simplex noise at ``points`` (..., 3), with lattice hashing by ``permutation`` (a shuffle of 0..255)."""
    table = torch.cat([permutation, permutation]).long()
    skew = points.sum(-1, keepdim=True) * _SKEW
    cell = torch.floor(points + skew)
    offset = points - (cell - cell.sum(-1, keepdim=True) * _UNSKEW)  # from the cell's first corner
    # Which of the six tetrahedra of the skewed cube holds the point: rank the offsets (ties broken
    # one fixed way), then step along the largest axis first, then the second largest.
    x, y, z = offset.unbind(-1)
    rank = torch.stack([(x >= y).int() + (x >= z).int(), (y > x).int() + (y >= z).int(),
                        (z > x).int() + (z > y).int()], dim=-1)
    corners = [torch.zeros_like(rank), (rank >= 2).int(), (rank >= 1).int(), torch.ones_like(rank)]
    lattice = cell.long() & 255
    total = torch.zeros(points.shape[:-1], dtype=points.dtype, device=points.device)
    for index, corner in enumerate(corners):
        relative = offset - corner + index * _UNSKEW
        i, j, k = (lattice + corner).unbind(-1)
        hashed = table[i + table[j + table[k]]] % 12
        gradient = _GRADIENTS.to(points.device, points.dtype)[hashed]
        falloff = (0.6 - (relative ** 2).sum(-1)).clamp(min=0.0)
        total = total + falloff ** 4 * (gradient * relative).sum(-1)
    return _SCALE * total


def simplex_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, *,
                  frequency: float = 1 / 64, octaves: int = 6, persistence: float = 0.8) -> torch.Tensor:
    """Unit-variance multi-octave simplex noise of ``shape`` (n, c, *spatial), 2 or 3 spatial axes.

    ``frequency`` is in cycles per voxel for the coarsest octave; each octave doubles it and
    scales its amplitude by ``persistence`` (AnoDDPM's defaults: 6 octaves, 0.8).
    """
    spatial = shape[2:]
    if len(spatial) not in (2, 3):
        raise ValueError(f"simplex noise needs 2 or 3 spatial axes, got shape {shape}")
    permutation = torch.randperm(256, generator=generator)
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in spatial), indexing="ij")
    grid = torch.stack(axes[::-1] if len(spatial) == 3 else (axes[1], axes[0], torch.zeros_like(axes[0])), dim=-1)
    fields = []
    for _ in range(shape[0] * shape[1]):
        origin = torch.rand(3, generator=generator) * 1024.0  # a random place in the infinite field
        field = torch.zeros(spatial)
        for octave in range(octaves):
            scale = frequency * 2.0 ** octave
            field += persistence ** octave * simplex3d(grid * scale + origin * (1 + octave), permutation)
        fields.append((field - field.mean()) / field.std().clamp(min=1e-6))
    return torch.stack(fields).reshape(shape)
