"""Model-space templates: a T1/T2 image and brain mask on the grid a model works on.

A template lives in ``Resources/Templates/<name>/`` with a ``template.json`` naming its
files and their SHA-256, and the licence notice of the data it derives from. Model cards
refer to templates by name, never by path, so a card cannot point outside the resources.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ModelPackageError
from .resources import templates_dir


@dataclass(frozen=True)
class Template:
    name: str
    image: sitk.Image
    brain_mask: sitk.Image
    description: str
    folder: Path

    @property
    def brain_image(self) -> sitk.Image:
        """The template without its skull: what a skull-stripped scan is registered to (registering
        it to a head with skull shrinks or stretches its brain into the skull)."""
        return sitk.Mask(sitk.Cast(self.image, sitk.sitkFloat32), self.brain_mask)

    def registration_target(self, skull_stripped: bool) -> sitk.Image:
        """What an input is registered to: the template's brain for a skull-stripped scan, else the head."""
        return self.brain_image if skull_stripped else self.image

    @property
    def brain_mask_voxels(self) -> int:
        return int(sitk.GetArrayViewFromImage(self.brain_mask).astype(bool).sum())

    @cached_property
    def brain_extent_mm(self) -> np.ndarray:
        """The brain's extent in mm along the world axes (its bounding box's)."""
        inside = np.argwhere(sitk.GetArrayViewFromImage(self.brain_mask) > 0)[:, ::-1]  # (x, y, z) indices
        return world_extent(self.brain_mask, inside.max(axis=0) - inside.min(axis=0) + 1)


def world_extent(image: sitk.Image, voxels: np.ndarray | None = None) -> np.ndarray:
    """Extent in mm along the world axes of ``voxels`` (x, y, z counts; default the whole grid) of ``image``."""
    counts = np.asarray(image.GetSize() if voxels is None else voxels, dtype=float)
    axes = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    return axes @ (counts * np.asarray(image.GetSpacing()))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_template(name: str, root: Path | None = None) -> Template:
    folder = (root or templates_dir()) / name
    manifest_path = folder / "template.json"
    if not manifest_path.is_file():
        raise ModelPackageError(f"template '{name}' not found in {folder.parent}")
    manifest = json.loads(manifest_path.read_text())
    images = {}
    for key in ("image", "brain_mask"):
        entry = manifest[key]
        path = folder / Path(entry["file"]).name
        if sha256_of(path) != entry["sha256"]:
            raise ModelPackageError(f"template '{name}': {path.name} does not match its SHA-256; reinstall the resources")
        images[key] = sitk.ReadImage(str(path), sitk.sitkFloat32 if key == "image" else sitk.sitkUInt8)
    return Template(name, images["image"], images["brain_mask"], manifest.get("description", ""), folder)


def write_template(folder: Path, name: str, image: sitk.Image, brain_mask: sitk.Image, description: str,
                   source: dict) -> Path:
    """Write a template folder (used by scripts/build_resources.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "description": description, "source": source}
    for key, file_name, img in (("image", "image.nii.gz", image), ("brain_mask", "brain_mask.nii.gz", brain_mask)):
        sitk.WriteImage(img, str(folder / file_name), useCompression=True)
        manifest[key] = {"file": file_name, "sha256": sha256_of(folder / file_name)}
    (folder / "template.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def resample_to_grid(image: sitk.Image, size, spacing, transform=None, interpolator=sitk.sitkLinear,
                     pixel=sitk.sitkFloat32) -> sitk.Image:
    """Resample onto an axis-aligned grid of ``size`` x ``spacing`` centred on ``image``'s centre."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(centre) - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    reference = sitk.Image([int(s) for s in size], pixel)
    reference.SetSpacing(spacing)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(origin.tolist())
    if interpolator != sitk.sitkNearestNeighbor:  # anti-alias before going coarser
        sigma = [max((s - o) / 2, 0.0) for s, o in zip(spacing, image.GetSpacing())]
        image = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, 0.0, pixel)
