"""Reading and validating input volumes, and writing images atomically.

Every check raises :class:`InputVolumeError` with one line that names the file and the
problem, before any work is done, so bad input never produces confident nonsense.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, OutputError, one_line

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
        with _native_stderr_silenced():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputVolumeError(f"{name} {path} cannot be read as an image: {_first_line(error)}") from None
    _check_header(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), f"{name} {path}")
    try:
        with _native_stderr_silenced():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputVolumeError(f"{name} {path} is corrupt or truncated: {_first_line(error)}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path, f"{name} {path}")
    return validate_volume(image, name=f"{name} {path}")


def _check_nifti_data(path: Path, name: str) -> None:
    """ITK's NIfTI reader pads a truncated file with zeros and turns NaN/Inf into 0 without a
    word; nibabel reads the same bytes strictly, so both are caught here."""
    import logging

    import nibabel

    nibabel_log = logging.getLogger("nibabel")
    level = nibabel_log.level
    nibabel_log.setLevel(logging.ERROR)  # its header fix-up warnings would print to stderr: ITK read the file
    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise several types for a cut file
        # nibabel's messages run over several lines ("...\n - could the file be damaged?")
        raise InputVolumeError(f"{name} is corrupt or truncated: {one_line(error)}") from None
    finally:
        nibabel_log.setLevel(level)
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


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Readers in C (the NIfTI library) print their own complaints straight to the process's
    stderr; the exception that follows says the same, so a bad file still ends in one line."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a source location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__
