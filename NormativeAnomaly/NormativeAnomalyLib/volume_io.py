"""Reading and validating input volumes, and writing images atomically.

Every check raises :class:`InputVolumeError` with one line that names the file and the
problem, before any work is done, so bad input never produces confident nonsense. What can
be judged from a header (data files it names, size, geometry, NIfTI extensions) is judged
before the voxels are read, so a hostile header costs neither memory nor time.

Here: the entry points and the checks on the image itself. ``volume_headers`` checks the files
a header makes the reader open, ``nifti_checks`` what ITK's NIfTI reader lets through, and
``dicom_series`` series folders.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .dicom_series import read_dicom_series
from .errors import InputVolumeError, OutputError, shown
from .nifti_checks import check_nifti_data, check_nifti_header
from .sitk_guard import first_line, image_information, numbers, quiet
from .volume_headers import (ORTHONORMAL_TOLERANCE, check_header, check_regular_file, checked_data_files,
                             itk_file_name, reader_of)

# Geometry no scan has: registration of such a volume runs for hours or never converges.
MAX_COORDINATE_MM = 1e6  # origin and field of view: a kilometre
MIN_SPACING_MM = 1e-3


def read_volume(path: str | os.PathLike, *, name: str = "input", data_root: Path | None = None) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA, ... or a DICOM series folder) as float32.

    Geometry (origin, spacing, direction) is kept as stored. Data files a header names must lie
    in ``data_root`` (default: the header's own folder).
    """
    path = Path(path)
    label = f"{name} {shown(path)}"
    if path.is_dir():
        return validate_volume(read_dicom_series(path, label), name=label)
    return validate_volume(_read_image_file(path, name, label, data_root), name=label)


def read_mask(path: str | os.PathLike, reference: sitk.Image) -> sitk.Image:
    """Read a brain mask and bring it onto ``reference``'s grid (nearest neighbour)."""
    path = Path(path)
    label = f"mask {shown(path)}"
    if path.is_dir():
        raise InputVolumeError(f"{label} is a folder; give the mask as one volume file")
    mask = _read_image_file(path, "mask", label)
    mask = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputVolumeError(f"{label} has no voxel inside the input volume")
    return mask


def _read_image_file(path: Path, name: str, label: str, data_root: Path | None = None) -> sitk.Image:
    """Every file-level check, the header, then the voxels."""
    check_regular_file(path, name, label)
    reader_name = reader_of(path, label)
    where = "the header's folder" if data_root is None else "the folder it may read from"
    data_files = checked_data_files(path, reader_name, data_root, label, where)
    if reader_name == "NiftiImageIO":
        check_nifti_header(path, label)
    with itk_file_name(path, data_files, label) as itk_name, quiet():
        reader = image_information(itk_name, f"{label} cannot be read as an image")
        check_header(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), label)
        _check_geometry(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection(), reader.GetSize(), label)
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputVolumeError(f"{label} is corrupt or truncated: {first_line(error)}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_data(path, label)
    return image


# --- Checks on what a header says --------------------------------------------------------------


def _check_geometry(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
                    size: Sequence[int], name: str) -> None:
    """Geometry no scan has, refused before registration would spend hours on it, and a
    direction that the NIfTI outputs cannot hold (they would lie off the input's grid)."""
    origin, spacing = np.asarray(origin, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    if not np.isfinite(origin).all() or np.abs(origin).max() > MAX_COORDINATE_MM:
        why = "not finite" if not np.isfinite(origin).all() else f"beyond {MAX_COORDINATE_MM:g} mm"
        raise InputVolumeError(f"{name} has its origin at ({numbers(origin)}) mm, {why}; "
                               "its header is corrupt: fix the origin")
    extent = spacing * np.asarray(size, dtype=np.float64)
    if not np.isfinite(spacing).all():
        why = "not finite"
    elif spacing.min() < MIN_SPACING_MM:
        why = f"under {MIN_SPACING_MM:g} mm"
    elif extent.max() > MAX_COORDINATE_MM:
        why = f"spanning {extent.max():.3g} mm"
    else:
        why = ""
    if why:
        raise InputVolumeError(f"{name} has a voxel spacing of ({numbers(spacing)}) mm, {why}; "
                               "its header is corrupt: fix the spacing")
    _check_direction(np.asarray(direction, dtype=np.float64).reshape(3, 3), name)


def _check_direction(direction: np.ndarray, name: str) -> None:
    if not np.isfinite(direction).all():
        raise InputVolumeError(f"{name} has a direction matrix that is not finite (NaN or infinite); "
                               "its header is corrupt")
    determinant = float(np.linalg.det(direction))
    if abs(determinant) < 1e-6:
        raise InputVolumeError(f"{name} has a singular direction matrix (determinant {determinant:.2g}: "
                               "its axes are zero, parallel or unreadable); its header is corrupt")
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > ORTHONORMAL_TOLERANCE:
        raise InputVolumeError(f"{name} has a direction matrix that is not orthonormal (sheared or scaled, "
                               f"off by {deviation:.3g}); resample it onto an orthogonal grid first")


def validate_volume(image: sitk.Image, *, name: str = "input") -> sitk.Image:
    """Check an in-memory image (e.g. from Slicer) and return it as float32."""
    check_header(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), name)
    _check_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize(), name)
    image = sitk.Cast(image, sitk.sitkFloat32)
    voxels = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(voxels)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise InputVolumeError(f"{name} has {bad:,} NaN or infinite voxels; fix or mask them first")
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        what = "empty (all zero)" if high == 0 else f"constant (every voxel is {high:g})"
        raise InputVolumeError(f"{name} is {what}; there is no image to analyse")
    labels = _label_values(voxels)
    if labels is not None:
        raise InputVolumeError(f"{name} looks like a label map or mask ({labels} distinct integer values), "
                               "not an MRI; give the scan itself")
    return image


# An MRI has hundreds of grey levels even after 8-bit quantisation; a segmentation or mask a few.
MAX_LABEL_VALUES = 16


def _label_values(voxels: np.ndarray) -> int | None:
    """The number of distinct values if the volume looks like a label map (few integers), else None.
    A sparse sample decides cheaply for almost every MRI before the whole volume is looked at."""
    for values in (voxels.ravel()[::97], voxels):
        if not np.array_equal(values, np.round(values)):
            return None
        distinct = np.unique(values).size
        if distinct > MAX_LABEL_VALUES:
            return None
    return int(distinct)


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The image's voxel-index -> physical (LPS) 4x4 matrix."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_image(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> None:
    """Write ``image`` so that ``path`` holds either the old file or the complete new one."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
        sitk.WriteImage(image, temporary, useCompression=compress)
        os.replace(temporary, path)
    except (RuntimeError, OSError) as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {first_line(error)}") from None
