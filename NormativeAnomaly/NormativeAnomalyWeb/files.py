"""What the web app may read and where it writes: allowed folders, uploads, its work folder.

A browser can only name volumes that this module listed (files inside the allowed folders,
or uploads it saved); every path is resolved (symbolic links included) and checked again
before it is read, so no path outside those folders can be reached through the UI. The data
files a header names (NRRD ``data file``, MetaImage ``ElementDataFile``) must lie in the same
shared folder as the header, or for an upload in its own upload folder.
Uploads are bounded in size and written only into the app's own work folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from NormativeAnomalyLib.errors import InputVolumeError as InputError
from NormativeAnomalyLib.volume_headers import check_data_files
from NormativeAnomalyLib.errors import shown

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DEFAULT_MAX_UPLOAD_MB = 512
MAX_LISTED = 500  # volumes listed per folder tree: a class folder, not a whole archive
MAX_DEPTH = 3


@dataclass(frozen=True)
class VolumeChoice:
    label: str  # what the browser shows
    path: Path  # resolved, inside an allowed folder or the uploads


class FileAccess:
    def __init__(self, allowed: list[Path], work_dir: Path | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024) -> None:
        self.allowed = [Path(folder).resolve() for folder in allowed]
        for folder in self.allowed:
            if not folder.is_dir():
                raise InputError(f"{folder} is not a folder")
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="normative-anomaly-web-")).resolve()
        self.uploads = self.work_dir / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)

    def close(self) -> None:
        """Remove the work folder when this session created it (uploads and downloads go with it)."""
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def volumes(self) -> list[VolumeChoice]:
        """Volume files in the allowed folders (a few levels deep) and the uploads, sorted by label."""
        choices = []
        for root in self.allowed + [self.uploads]:
            prefix = "uploads" if root == self.uploads else root.name
            for path in _volume_files(root):
                resolved = path.resolve()
                # Not a link leading out of the shared folders, and a name the page can show.
                if self._shared(resolved) and _utf8(str(resolved)):
                    choices.append(VolumeChoice(f"{prefix}/{path.relative_to(root).as_posix()}", resolved))
        return sorted(choices, key=lambda choice: choice.label)

    def resolve(self, path: str | os.PathLike) -> Path:
        """The file the browser asked for, if it may be read; otherwise a one-line InputError."""
        try:
            resolved = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):
            raise InputError(f"{shown(Path(path).name or path)}: no such file") from None
        if not self._shared(resolved):
            raise InputError(f"{shown(Path(path).name)}: not in a folder this server shares")
        if not (resolved.is_file() and resolved.name.lower().endswith(VOLUME_SUFFIXES)):
            raise InputError(f"{shown(resolved.name)}: not a volume file ({', '.join(VOLUME_SUFFIXES)})")
        if not _utf8(str(resolved)):  # the scene (VTK) takes UTF-8 names only
            raise InputError(f"{shown(resolved.name)}: its path is not UTF-8 text; rename it to open it here")
        check_data_files(resolved, self.data_root(resolved), label=shown(resolved.name),
                         where=self._where(resolved))
        return resolved

    def _shared(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(root) for root in self.allowed + [self.uploads])

    def data_root(self, resolved: Path) -> Path:
        """The folder a shared file's header may take data files from: the widest shared folder
        holding it; for an upload its own upload folder (one upload never reads another)."""
        if resolved.is_relative_to(self.uploads):
            return self.uploads / resolved.relative_to(self.uploads).parts[0]
        return min((root for root in self.allowed if resolved.is_relative_to(root)), key=lambda root: len(root.parts))

    def _where(self, resolved: Path) -> str:
        return "its upload" if resolved.is_relative_to(self.uploads) else "the folder this server shares"

    def save_upload(self, name: str, content: bytes) -> Path:
        """Write an upload into the work folder under a safe, new name; refuse it if too large."""
        if len(content) > self.max_upload_bytes:
            raise InputError(f"{safe_name(name)}: {len(content) / 2**20:.1f} MB is over the upload limit of "
                             f"{self.max_upload_bytes / 2**20:.0f} MB")
        name = safe_name(name)
        if not name.lower().endswith(VOLUME_SUFFIXES) or name.lower().endswith((".nhdr", ".mhd")):
            raise InputError(f"{name}: upload a single-file volume (.nii, .nii.gz, .nrrd or .mha)")
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads))
        target = folder / name
        with open(target, "xb") as stream:  # a new file in a new folder: nothing is overwritten
            stream.write(content)
        try:  # a header naming a data file elsewhere on the server is not kept
            check_data_files(target, folder, label=name, where="its upload")
        except InputError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return target

    def download_dir(self) -> Path:
        """A new folder for one download's files."""
        downloads = self.work_dir / "downloads"
        downloads.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="export-", dir=downloads))


def safe_name(name: str) -> str:
    """A browser-supplied file name reduced to its last part, in plain characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return base[:120] or "upload"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, kept by Python as surrogates
        return False
    return True


def _volume_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if depth < MAX_DEPTH else []
        for name in sorted(files):
            if name.lower().endswith(VOLUME_SUFFIXES) and not name.startswith("."):
                found.append(Path(folder) / name)
                if len(found) >= MAX_LISTED:
                    return found
    return found
