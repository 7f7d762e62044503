"""The run contract: what ``normative-anomaly run`` leaves in its output folder, how the folder
is claimed, and how a front end reads it back; the exit codes, message prefixes and progress
lines a parent process sees.

Torch-free, so the Slicer panel, the web app and batch can read runs without the models:
``outputs`` writes the set with these names, ``batch`` and the GUIs read ``run.json`` through
``RunSummary`` and the maps through ``read_run_folder``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .errors import OutputError, one_line, shown
from .progress import overall_fraction

if TYPE_CHECKING:  # imported where used: the CLI imports this module before parsing its arguments
    import SimpleITK as sitk

    from .scoring import Calibration

PSEUDO_HEALTHY = "pseudo_healthy.nii.gz"
ANOMALY_MAP = "anomaly_map.nii.gz"
SEGMENTATION = "anomalies.seg.nrrd"
LESIONS_CSV = "lesions.csv"
LESIONS_JSON = "lesions.json"
REPORT = "report.png"
RUN_JSON = "run.json"  # written last: its presence marks a complete set
UNCERTAINTY_MAP = "uncertainty_map.nii.gz"  # only from models that give one (diffusion with several samples)
OUTPUT_FILES = (PSEUDO_HEALTHY, ANOMALY_MAP, SEGMENTATION, LESIONS_CSV, LESIONS_JSON, REPORT, RUN_JSON)
# What a front end reads back (``--maps-only``): it segments, tabulates and reports itself.
MAP_FILES = (PSEUDO_HEALTHY, ANOMALY_MAP, RUN_JSON)
OPTIONAL_OUTPUT_FILES = (UNCERTAINTY_MAP,)
# The order a set is moved in: run.json, which marks a set as complete, last (and out first).
SET_ORDER = OPTIONAL_OUTPUT_FILES + OUTPUT_FILES
LESION_COLUMNS = ("id", "voxels", "volume_ml", "max_score", "mean_score", "centroid_r", "centroid_a", "centroid_s")
# The longest file name most file systems take, in bytes.
MAX_NAME_BYTES = 255
# Hidden names beside an output folder NAME: ".NAME" + one of these (+ mkdtemp's random part).
LOCK_MARK, STAGING_MARK, ASIDE_MARK = ".normative-anomaly.lock", ".partial-", ".replaced-"
_RANDOM_PART = 8  # characters tempfile.mkdtemp adds to a prefix...
_RANDOM_PART_CHARACTERS = re.compile(r"[a-z0-9_]+")  # ...of these
_PROBE_PREFIX = ".normative-anomaly-probe-"

# --- What the parent process sees ------------------------------------------------------------

EXIT_OK, EXIT_ERROR, EXIT_INTERNAL, EXIT_CANCELLED = 0, 1, 3, 130  # 130: SIGTERM / Ctrl-C, nothing written
MESSAGE_PREFIX = "normative-anomaly: "  # every line the CLI writes to stderr
ERROR_PREFIX = MESSAGE_PREFIX + "error: "  # a user error's one line
PROGRESS_PREFIX = "NORMATIVE_ANOMALY_PROGRESS "


def progress_line(stage: str, fraction: float) -> str:
    """One machine-readable progress line (``--progress-lines``), read back by :func:`parse_progress_line`."""
    return f"{PROGRESS_PREFIX}{stage} {fraction:.4f} {overall_fraction(stage, fraction):.4f}"


def parse_progress_line(line: str) -> tuple[str, float, float] | None:
    """(stage, stage fraction, overall fraction) from a progress line; None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        stage, fraction, overall = line[len(PROGRESS_PREFIX):].split()
        return stage, float(fraction), float(overall)
    except ValueError:
        return None


def without_prefix(message: str) -> str:
    """The CLI's last stderr line as a GUI shows it: without the program's prefixes."""
    message = message.strip()
    for prefix in (ERROR_PREFIX, MESSAGE_PREFIX):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


# --- The destination ------------------------------------------------------------------------


def output_folder(out_dir: str | os.PathLike) -> Path:
    """The folder ``out_dir`` names, absolute; a symbolic link is followed to the folder it
    points to (the outputs go there, the link stays), and a link to nothing is refused."""
    out_dir = Path(out_dir).absolute()
    try:
        if not out_dir.is_symlink():
            return out_dir
        target = out_dir.resolve()
        if not target.is_dir():
            raise OutputError(f"{shown(out_dir)} is a symbolic link to {shown(target)}, which is not a folder; "
                              "remove the link or choose another --out")
        return target
    except OSError as error:
        raise unwritable(out_dir, error) from None


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, a folder whose contents would be replaced or that cannot be
    written; returns the folder that will be written (see ``output_folder``)."""
    folder = output_folder(out_dir)
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{shown(folder)} exists and is not a folder")
        if folder.is_dir():
            if any(folder.iterdir()) and not overwrite:
                raise OutputError(f"{shown(folder)} is not empty; choose another --out or pass --overwrite")
            _refuse_folders_named_like_outputs(folder)
            _check_writable(folder)
        _check_writable(_folder_above(folder))  # where the staging folder goes
    except OSError as error:
        raise unwritable(folder, error) from None
    return folder


def _refuse_folders_named_like_outputs(folder: Path) -> None:
    """--overwrite replaces output files; a folder with an output's name is the user's, not ours."""
    for name in SET_ORDER:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            raise OutputError(f"{shown(folder / name)} is a folder, not an output of an earlier run; move it away "
                              "(--overwrite replaces output files only)")


def _check_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: what the run will do there, tried before the work."""
    try:
        handle, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as error:
        raise OSError(error.errno, error.strerror, os.fspath(folder)) from None  # the folder, not the probe's name
    os.close(handle)
    os.unlink(probe)


def _folder_above(out_dir: Path) -> Path:
    """The nearest existing folder above ``out_dir``: where the missing ones will be created."""
    above = out_dir.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"cannot write to {shown(out_dir)}: {shown(above)} is not a folder")
    return above


def unwritable(out_dir: Path, error: OSError) -> OutputError:
    """The one-line error for a destination the system refuses (read-only, /proc, name too long...)."""
    where = f" ({shown(error.filename)})" if error.filename and os.fspath(error.filename) != os.fspath(out_dir) else ""
    return OutputError(f"cannot write to {shown(out_dir)}: {error.strerror or one_line(error)}{where}")


def sibling_name(out_dir: Path, mark: str) -> str:
    """``.NAME<mark>``: the hidden lock, staging or set-aside name beside the folder NAME. A NAME
    so long that this would pass MAX_NAME_BYTES is shortened and followed by a hash of the whole
    NAME, so the result stays unique to the folder."""
    name = out_dir.name
    room = MAX_NAME_BYTES - _RANDOM_PART - len(os.fsencode(mark)) - 1
    if len(os.fsencode(name)) <= room:
        return f".{name}{mark}"
    digest = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    head = name
    while len(os.fsencode(head + digest)) > room:
        head = head[:-1]
    return f".{head}{digest}{mark}"


def staging_folders(out_dir: Path) -> list[Path]:
    """Staging folders of ``out_dir`` left by a killed run: its prefix and a random part only
    (``.a.partial-`` also begins the staging folders of a folder named ``a.partial-b``)."""
    prefix = sibling_name(out_dir, STAGING_MARK)
    return [path for path in out_dir.parent.iterdir()
            if path.name.startswith(prefix) and _RANDOM_PART_CHARACTERS.fullmatch(path.name[len(prefix):])]


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for a whole run, or refuse at once.

    Two runs into one folder would each pass the empty-folder check, compute for minutes, and
    the second would then replace the first's files with a set that mixes nothing but is not
    what the first user asked for. The lock is an OS file lock (``flock``) on a hidden file
    beside the folder: it dies with its process, so a crash never leaves a stale lock behind.
    A destination that cannot be created or written is refused here, in one line.
    """
    out_dir = output_folder(out_dir)
    created = [folder for folder in [out_dir.parent, *out_dir.parent.parents] if not os.path.lexists(folder)]
    try:
        handle, path = _acquire(out_dir)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)  # closing releases the lock
        _remove_empty(created)  # a run leaves no new empty parent folders behind


def _acquire(out_dir: Path) -> tuple[int, Path]:
    try:
        _folder_above(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise unwritable(out_dir, error) from None
    path = out_dir.parent / sibling_name(out_dir, LOCK_MARK)
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise unwritable(out_dir, error) from None
        try:
            _lock(handle)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "?"
            os.close(handle)
            raise OutputError(f"another run (process {holder}) is writing to {shown(out_dir)}; wait for it to "
                              "finish or choose another --out") from None
        try:  # the holder we waited on may have removed the file: then lock the new one
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)
    os.ftruncate(handle, 0)
    os.pwrite(handle, str(os.getpid()).encode(), 0)
    return handle, path


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            break


def _lock(handle: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: an exclusive byte-range lock instead
        import msvcrt

        try:
            msvcrt.locking(handle, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- Modes and JSON -------------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (setting it to
    read it races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What open() gives a new file: tempfile's 0o600 would hide outputs from the user's group."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """What mkdir gives a new folder (tempfile.mkdtemp gives 0o700)."""
    return 0o777 & ~_umask()


def standard_json(value: Any, indent: int | None = 2) -> str:
    """JSON as the standard has it: NaN and infinities, for which it has no words, become null."""
    return json.dumps(_finite_or_null(value), indent=indent, default=str, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


# --- Reading a finished run back -------------------------------------------------------------

MODEL_FIELDS = ("name", "version", "family", "modality", "description", "license", "training_data")


@dataclass(frozen=True)
class RunSummary:
    """The fields of run.json that front ends and batch read (the file holds more: see outputs.run_summary)."""

    input: str | None
    settings: dict[str, Any]
    calibration: Calibration  # healthy false-positive rate <-> threshold
    threshold: float
    min_lesion_mm3: float
    lesion_count: int
    lesion_volume_ml: float
    model: dict[str, Any]  # MODEL_FIELDS of the card

    @classmethod
    def from_json(cls, summary: dict[str, Any]) -> "RunSummary":
        from .scoring import Calibration

        return cls(input=summary.get("input"), settings=summary.get("settings") or {},
                   calibration=Calibration(tuple(summary["calibration"]["fpr"]),
                                           tuple(summary["calibration"]["threshold"])),
                   threshold=float(summary["threshold"]), min_lesion_mm3=float(summary["min_lesion_mm3"]),
                   lesion_count=int(summary["lesion_count"]), lesion_volume_ml=float(summary["lesion_volume_ml"]),
                   model={key: summary["model"].get(key, "") for key in MODEL_FIELDS})


def read_run_summary(out_dir: str | os.PathLike) -> RunSummary:
    """run.json of a finished run in ``out_dir``; OutputError if there is none or it is incomplete."""
    path = Path(out_dir) / RUN_JSON
    try:
        return RunSummary.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise OutputError(f"{shown(Path(out_dir))} does not hold a complete run ({RUN_JSON}: "
                          f"{one_line(error)})") from None


@dataclass
class RunOutputs:
    """A finished run as a front end loads it: the maps, and run.json's summary."""

    pseudo_healthy: sitk.Image  # on the input's grid
    anomaly_map: sitk.Image  # on the input's grid
    summary: RunSummary
    uncertainty: sitk.Image | None = None  # variance over stochastic reconstructions (diffusion), on the input's grid

    @property
    def calibration(self) -> Calibration:  # healthy false-positive rate <-> threshold
        return self.summary.calibration

    @property
    def threshold(self) -> float:
        return self.summary.threshold

    @property
    def min_lesion_mm3(self) -> float:
        return self.summary.min_lesion_mm3

    @property
    def model(self) -> dict[str, Any]:  # MODEL_FIELDS of the card
        return self.summary.model


def read_run_folder(out_dir: str | os.PathLike) -> RunOutputs:
    """The maps and settings that ``normative-anomaly run`` wrote into ``out_dir``."""
    out_dir = Path(out_dir)
    summary = read_run_summary(out_dir)
    uncertainty_path = out_dir / UNCERTAINTY_MAP
    return RunOutputs(_read_map(out_dir / PSEUDO_HEALTHY), _read_map(out_dir / ANOMALY_MAP), summary,
                      _read_map(uncertainty_path) if uncertainty_path.exists() else None)


def _read_map(path: Path) -> sitk.Image:
    import SimpleITK as sitk

    # Our own output, so no input checks (an all-zero anomaly map is a valid result).
    try:
        return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    except RuntimeError as error:
        raise OutputError(f"cannot read {shown(path)}: {str(error).strip().splitlines()[-1]}") from None
