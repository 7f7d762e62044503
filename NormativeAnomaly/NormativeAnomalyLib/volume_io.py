"""Reading and validating input volumes, and writing images atomically.

Every check raises :class:`InputVolumeError` with one line that names the file and the
problem, before any work is done, so bad input never produces confident nonsense.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, OutputError

# A 512^3 float32 volume is 0.5 GB; the pipeline holds a few copies. Larger inputs are
# refused rather than risking the host (Slicer shares this process).
MAX_VOXELS = 512**3
MIN_VOXELS_PER_AXIS = 8


def read_volume(path: str | os.PathLike, *, name: str = "input") -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA, ... or a DICOM series folder) as float32.

    Geometry (origin, spacing, direction) is kept as stored.
    """
    path = Path(path)
    if not path.exists():
        raise InputVolumeError(f"{name} not found: {path}")
    if path.is_dir():
        return validate_volume(_read_dicom_series(path), name=f"{name} {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputVolumeError(f"{name} {path} cannot be read as an image: {_first_line(error)}") from None
    _check_header(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), f"{name} {path}")
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputVolumeError(f"{name} {path} is corrupt or truncated: {_first_line(error)}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path, f"{name} {path}")
    return validate_volume(image, name=f"{name} {path}")


def _check_nifti_data(path: Path, name: str) -> None:
    """ITK's NIfTI reader pads a truncated file with zeros and turns NaN/Inf into 0 without a
    word; nibabel reads the same bytes strictly, so both are caught here."""
    import nibabel

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise several types for a cut file
        raise InputVolumeError(f"{name} is corrupt or truncated: {error}") from None
    if data.dtype.kind in "fc":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputVolumeError(f"{name} has {bad:,} NaN or infinite voxels; fix or mask them first")


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputVolumeError(f"{folder} is a folder with no DICOM series in it")
    if len(series_ids) > 1:
        raise InputVolumeError(
            f"{folder} holds {len(series_ids)} DICOM series; put the one to analyse in a folder of its own"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputVolumeError(f"DICOM series in {folder} cannot be read: {_first_line(error)}") from None


def _check_header(dimension: int, components: int, size: tuple[int, ...], name: str) -> None:
    if dimension != 3:
        raise InputVolumeError(f"{name} is {dimension}D; a 3D volume is needed")
    if components != 1:
        raise InputVolumeError(f"{name} has {components} components per voxel; a scalar (grey-level) volume is needed")
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputVolumeError(
            f"{name} is {'x'.join(map(str, size))} voxels; at least {MIN_VOXELS_PER_AXIS} along each axis are needed"
        )
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise InputVolumeError(
            f"{name} has {voxels:,} voxels, over the limit of {MAX_VOXELS:,}; resample it to a coarser grid first"
        )


def validate_volume(image: sitk.Image, *, name: str = "input") -> sitk.Image:
    """Check an in-memory image (e.g. from Slicer) and return it as float32."""
    _check_header(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), name)
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
    return image


def read_mask(path: str | os.PathLike, reference: sitk.Image) -> sitk.Image:
    """Read a brain mask and bring it onto ``reference``'s grid (nearest neighbour)."""
    path = Path(path)
    if not path.exists():
        raise InputVolumeError(f"mask not found: {path}")
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputVolumeError(f"mask {path} cannot be read: {_first_line(error)}") from None
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputVolumeError(f"mask {path} must be a 3D scalar image")
    mask = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    if not sitk.GetArrayViewFromImage(mask).any():
        raise InputVolumeError(f"mask {path} has no voxel inside the input volume")
    return mask


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
        raise OutputError(f"cannot write {path}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a source location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__
