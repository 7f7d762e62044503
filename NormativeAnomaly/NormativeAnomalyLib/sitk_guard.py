"""Guards around SimpleITK and the C readers under it, so that a bad input ends in one
printable line rather than pages of native output or an aborted process.

Shared by ``volume_io``, ``volume_headers``, ``nifti_checks`` and ``dicom_series``; kept here
so that none of the last three needs to import ``volume_io``, which imports them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import SimpleITK as sitk

from .errors import InputVolumeError


def numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{float(value):.4g}" for value in values)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a source location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__


def is_utf8(text: str) -> bool:
    """Whether SimpleITK can take ``text`` as a name: it aborts the whole process on one that is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def quiet() -> Iterator[None]:
    """ITK, GDCM and the NIfTI library print warnings and complaints straight to the process's
    stderr; the checks here and the exception that follows say what matters in one line."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _native_stderr_silenced():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


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


def image_information(name: str, failure: str) -> sitk.ImageFileReader:
    """A reader holding the header of the file ITK knows as ``name`` (the voxels not read yet);
    an unreadable header raises InputVolumeError "``failure``: <ITK's reason>"."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputVolumeError(f"{failure}: {first_line(error)}") from None
    return reader
