"""DICOM series folders: found, checked and read as one volume.

GDCM opens every file in the folder and the series reader stacks slices as if evenly spaced,
so a pipe in the folder, a name SimpleITK aborts on, or a missing, duplicated or displaced
slice is refused here with one line before the voxels are read.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError, shown
from .sitk_guard import first_line, image_information, is_utf8, numbers, quiet
from .volume_headers import ORTHONORMAL_TOLERANCE, check_header

MAX_SLICE_DEVIATION = 0.01  # a DICOM slice may sit 1% of the spacing away from its uniform place


def has_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` holds a DICOM series (safely: no pipe opened, any file name)."""
    try:
        _check_folder_entries(folder, shown(folder))
        with _dicom_folder(folder, shown(folder)) as itk_folder, quiet():
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_folder))
    except (InputVolumeError, OSError):
        return False


def read_dicom_series(folder: Path, label: str) -> sitk.Image:
    """The one DICOM series in ``folder``, its slices checked before they are stacked."""
    _check_folder_entries(folder, label)
    with _dicom_folder(folder, label) as itk_folder, quiet():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_folder)
        if not series_ids:
            raise InputVolumeError(f"{label} is a folder with no DICOM series in it")
        if len(series_ids) > 1:
            raise InputVolumeError(
                f"{label} holds {len(series_ids)} DICOM series; put the one to analyse in a folder of its own"
            )
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_folder, series_ids[0])
        _check_slices(files, label)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise InputVolumeError(f"DICOM series in {label} cannot be read: {first_line(error)}") from None


def _check_folder_entries(folder: Path, label: str) -> None:
    """The DICOM scanner opens every file in the folder: a pipe there would block it for good."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise InputVolumeError(f"{label} cannot be listed: {error.strerror}") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # a broken link: the scanner skips it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputVolumeError(f"{label} holds {shown(entry.name)!r}, which is not a regular file "
                                   "(a pipe, device or socket); remove it from the series folder")


@contextmanager
def _dicom_folder(folder: Path, label: str) -> Iterator[str]:
    """The folder name to give GDCM; where it or a file name in it is not UTF-8 (SimpleITK would
    abort the process), a temporary folder of links with plain names to its files."""
    names = [entry.name for entry in os.scandir(folder)]
    if all(is_utf8(text) for text in [str(folder), *names]):
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="normative-anomaly-dicom-") as links:
        try:
            for number, name in enumerate(sorted(names)):
                if (folder / name).is_file():
                    os.symlink((folder / name).absolute(), Path(links) / f"{number:06d}.dcm")
        except OSError:
            raise InputVolumeError(f"{label} cannot be read under its name (it is not UTF-8); "
                                   "rename it with plain characters") from None
        yield links


class _Slice(NamedTuple):
    size: tuple[int, ...]
    origin: np.ndarray
    direction: np.ndarray


def _check_slices(files: Sequence[str], label: str) -> None:
    """The series reader stacks slices as if evenly spaced (a warning at most): a missing,
    duplicated or displaced slice would put every voxel after it at the wrong place."""
    if len(files) < 2:
        return  # one (multi-frame) file: its own header places its frames
    first = _slice_info(files[0], label)
    if first is None or first.size[2] > 1:
        return  # not slices (a series of volumes): ITK's own checks apply

    check_header(3, 1, (first.size[0], first.size[1], len(files)), label)  # before reading every slice
    slices = [first] + [_slice_info(name, label) for name in files[1:]]
    if any(s is None or s.size[:2] != first.size[:2] for s in slices):
        raise InputVolumeError(f"{label} mixes slices of different sizes; export the series again")
    if any(np.abs(s.direction[:, :2] - first.direction[:, :2]).max() > ORTHONORMAL_TOLERANCE for s in slices):
        raise InputVolumeError(f"{label} mixes slices of different orientations; export the series again")
    normal = np.cross(first.direction[:, 0], first.direction[:, 1])
    positions = np.sort([float(s.origin @ normal) for s in slices])
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    tolerance = MAX_SLICE_DEVIATION * spacing + 1e-4
    if spacing <= tolerance:
        raise InputVolumeError(f"{label} has its {len(files)} slices at {len(set(np.round(positions, 3)))} "
                               "position(s) (duplicated slices); export the series again")
    if np.abs(steps - spacing).max() <= tolerance:
        return
    duplicated, gaps = int((steps <= tolerance).sum()), steps[steps > spacing + tolerance]
    if duplicated:
        problem = f"{duplicated} duplicated slice(s) at the same position"
    elif gaps.size and (gaps >= 1.5 * spacing).all():
        missing = int(np.round(gaps / spacing).sum() - gaps.size)
        problem = f"{missing} missing slice(s): gaps of {numbers(np.unique(np.round(gaps, 2)))} mm"
    else:
        problem = f"unevenly spaced slices: {steps.min():.3g} to {steps.max():.3g} mm apart"
    raise InputVolumeError(f"{label} has {problem} where the slices are {spacing:.3g} mm apart; "
                           "export the complete series again (or resample it)")


def _slice_info(name: str, label: str) -> _Slice | None:
    reader = image_information(name, f"DICOM series in {label} cannot be read")
    if reader.GetDimension() != 3:
        return None
    return _Slice(tuple(reader.GetSize()), np.asarray(reader.GetOrigin(), dtype=np.float64),
                  np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3))
