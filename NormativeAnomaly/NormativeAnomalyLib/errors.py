"""Exceptions that carry a one-line, user-facing message.

Front ends (CLI, Slicer, web) print ``str(error)`` as is, so messages name the file or
setting at fault and say what to do.
"""

from __future__ import annotations

import os


def one_line(error: BaseException | str) -> str:
    """A message folded onto one line: libraries (nibabel, MONAI constructors, zipfile) write
    several, and front ends show exactly one."""
    return " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")


class NormativeAnomalyError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputVolumeError(NormativeAnomalyError):
    """The input image cannot be used (missing, wrong dimensionality, NaNs, empty...)."""


class ModelPackageError(NormativeAnomalyError):
    """A model package is missing, malformed, tampered with or unsupported."""


class OutputError(NormativeAnomalyError):
    """Outputs cannot be written without losing the user's data."""


class RegistrationError(NormativeAnomalyError):
    """Registration to the model's template failed."""


class Cancelled(NormativeAnomalyError):
    """The user cancelled the run; nothing was written."""


def shown(path: str | os.PathLike) -> str:
    """A path as one printable line: a newline or undecodable byte in a name would otherwise
    break the one-line message."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)[1:-1]
