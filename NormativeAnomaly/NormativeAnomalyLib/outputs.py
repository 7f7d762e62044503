"""Writing a result: the file names scripts rely on, written as one complete set.

Everything is written into a staging folder beside the output folder and moved in at the
end, so a crash or Cancel leaves either the previous outputs or the complete new set.
An output folder that already holds files is refused unless ``overwrite`` is given, and a
second run into a folder another run is writing is refused (``output_lock``). Whether the
folder can be written is checked before any work (``check_output_folder``), not after it.
Files and folders follow the umask, as every other tool's do.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import slicerio

from . import __version__
from .errors import OutputError, one_line
from .pipeline import AnomalyResult, alignment_cutoff, tissue_order_minimum
from .progress import Monitor
from .report import write_report
from .sitk_guard import is_utf8
from .volume_io import ijk_to_lps, shown, write_image

OUTPUT_FILES = ("pseudo_healthy.nii.gz", "anomaly_map.nii.gz", "anomalies.seg.nrrd", "lesions.csv", "lesions.json",
                "report.png", "run.json")
# Written only by models that give one (diffusion with several samples).
OPTIONAL_OUTPUT_FILES = ("uncertainty_map.nii.gz",)
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


def write_segmentation(path: Path, result: AnomalyResult) -> None:
    """A .seg.nrrd that 3D Slicer opens as a segmentation node, on the input's grid."""
    mask = result.segmentation.mask.transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    segmentation = slicerio.create_segmentation(mask.shape, ijk_to_lps(result.input_image))
    slicerio.add_segment(segmentation, mask, {"id": "Anomaly", "name": "Anomaly", "color": [1.0, 0.85, 0.1]})
    slicerio.write_segmentation(str(path), segmentation)


def run_summary(result: AnomalyResult, settings: dict[str, Any]) -> dict[str, Any]:
    card = result.model.card
    return {
        "tool": f"normative-anomaly {__version__}",
        "input": settings.get("input"),
        "model": {"name": card["name"], "version": card["version"], "family": card["family"],
                  "modality": card["modality"], "description": card["description"], "license": card["license"],
                  "training_data": card["training"].get("data", ""), "path": str(result.model.path)},
        "device": result.device,
        # precision, batch size and any fallback (e.g. GPU out of memory -> CPU) on the way
        "device_use": dataclasses.asdict(result.device_use) if result.device_use is not None else None,
        "registration": {"kind": result.registration.kind, "final_metric": _finite(result.registration.metric),
                         # correlation with the template over the brain; runs under the cut-off are refused
                         "alignment": _finite(round(result.alignment, 4)),
                         "alignment_cutoff": alignment_cutoff(card["modality"]),
                         "tissue_order": _finite(round(result.tissue_order, 4)),
                         "tissue_order_minimum": tissue_order_minimum(card["modality"]),
                         "brain_overlap": _finite(round(result.brain_overlap, 4)),
                         # scored on the scan's own brain (skull-stripped) or on the template's, mapped
                         "skull_stripped": result.skull_stripped},
        "threshold": result.segmentation.threshold,
        "threshold_healthy_fpr": result.threshold_fpr,
        "min_lesion_mm3": result.segmentation.min_lesion_mm3,
        # So a front end can move the threshold and show its healthy false-positive rate without the package.
        "calibration": {"fpr": list(result.model.calibration.fpr),
                        "threshold": list(result.model.calibration.threshold)},
        "lesion_count": len(result.segmentation.kept),
        "lesion_volume_ml": round(sum(l.volume_ml for l in result.segmentation.kept), 4),
        "settings": settings,
        "seconds": result.seconds,
        "outputs": list(OUTPUT_FILES) + (["uncertainty_map.nii.gz"] if result.uncertainty is not None else []),
    }


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def write_outputs(result: AnomalyResult, out_dir: str | os.PathLike, settings: dict[str, Any] | None = None,
                  overwrite: bool = False, extra_summary: dict[str, Any] | None = None,
                  cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write the whole set into ``out_dir`` (a link is followed to its folder), or nothing.

    ``cancel`` is asked before each file and before the set is moved in: a Cancel until then
    leaves the folder as it was (Cancelled); once the set is in place it is too late.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    summary = run_summary(result, settings or {}) | (extra_summary or {})
    monitor = Monitor(cancel=cancel)
    with _staging(out_dir) as staging:
        try:
            _write_set(result, summary, staging, monitor)
        except OSError as error:
            raise OutputError(f"cannot write the outputs for {shown(out_dir)}: "
                              f"{error.strerror or one_line(error)}") from None
        monitor.check()
        _move_into_place(staging, out_dir)
    return summary


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A new staging folder beside ``out_dir`` (removed unless it became ``out_dir``)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=sibling_name(out_dir, STAGING_MARK), dir=out_dir.parent))
        staging.chmod(folder_mode())  # it may become the output folder
    except OSError as error:
        raise unwritable(out_dir, error) from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_set(result: AnomalyResult, summary: dict[str, Any], staging: Path, monitor: Monitor) -> None:
    volumes = [("pseudo_healthy.nii.gz", result.pseudo_healthy), ("anomaly_map.nii.gz", result.anomaly_map)]
    if result.uncertainty is not None:
        volumes.append(("uncertainty_map.nii.gz", result.uncertainty))
    with _itk_names(staging) as itk_folder:  # ITK writes the volumes through a name it can take
        for name, image in volumes:
            monitor.check()
            write_image(image, itk_folder / name)
    monitor.check()
    write_segmentation(staging / "anomalies.seg.nrrd", result)
    rows = [lesion.as_dict() for lesion in result.segmentation.lesions]
    (staging / "lesions.json").write_text(standard_json(rows) + "\n", encoding="utf-8")
    with open(staging / "lesions.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(LESION_COLUMNS)
        for lesion in result.segmentation.lesions:
            writer.writerow([lesion.id, lesion.voxels, lesion.volume_ml, lesion.max_score, lesion.mean_score,
                             *lesion.centroid_ras])
    monitor.check()
    write_report(staging / "report.png", result)
    (staging / "run.json").write_text(standard_json(summary) + "\n", encoding="utf-8")
    for path in staging.iterdir():
        path.chmod(file_mode())


@contextmanager
def _itk_names(folder: Path) -> Iterator[Path]:
    """``folder``, or where its name is not UTF-8 (which ITK cannot take: it aborts the whole
    process) a link to it with a plain name in a temporary folder."""
    if is_utf8(os.fspath(folder)):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="normative-anomaly-") as temporary:
        link = Path(temporary) / "outputs"
        try:
            if not is_utf8(os.fspath(link)):
                raise OSError(f"the temporary folder {shown(temporary)} is not named in UTF-8 either")
            os.symlink(folder, link, target_is_directory=True)
        except OSError as error:
            raise OutputError(f"cannot write images under {shown(folder)}, whose name is not UTF-8: "
                              f"{error.strerror or one_line(error)}; choose another --out") from None
        yield link


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Put the staged set in ``out_dir`` as a whole: a new (or empty) folder is the staging
    folder renamed; in a folder with an earlier set (--overwrite) the earlier files are set
    aside, the new ones moved in, and on any failure the earlier ones put back. The user's
    other files stay. A process killed during the swap (milliseconds) leaves no run.json,
    which marks a set complete, and the earlier files in the hidden set-aside folder."""
    try:
        if not out_dir.exists():
            os.rename(staging, out_dir)  # the whole set appears at once
            return
        if not any(out_dir.iterdir()) and _replaced_empty_folder(staging, out_dir):
            return
        aside = Path(tempfile.mkdtemp(prefix=sibling_name(out_dir, ASIDE_MARK), dir=out_dir.parent))
    except OSError as error:
        raise unwritable(out_dir, error) from None
    earlier = [name for name in reversed(SET_ORDER)
               if os.path.lexists(out_dir / name) and not (out_dir / name).is_dir()]
    moves = [(out_dir / name, aside / name) for name in earlier]
    moves += [(staging / name, out_dir / name) for name in SET_ORDER if (staging / name).exists()]
    done: list[tuple[Path, Path]] = []
    try:
        for source, destination in moves:
            os.rename(source, destination)
            done.append((source, destination))
    except BaseException as error:
        restored = _undo(done)
        if restored:
            shutil.rmtree(aside, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        kept = "the earlier outputs are kept" if restored else f"the earlier outputs are in {shown(aside)}"
        raise OutputError(f"cannot replace the outputs in {shown(out_dir)}: "
                          f"{error.strerror or one_line(error)}; {kept}") from None
    shutil.rmtree(aside, ignore_errors=True)


def _replaced_empty_folder(staging: Path, out_dir: Path) -> bool:
    """The empty ``out_dir`` replaced by the staging folder, so that the set appears at once;
    False where it cannot be removed (a mount point): it is then filled file by file."""
    try:
        out_dir.rmdir()
    except OSError:
        return False
    try:
        os.rename(staging, out_dir)
    except OSError:
        out_dir.mkdir(exist_ok=True)  # the user's empty folder back
        raise
    return True


def _undo(moves: list[tuple[Path, Path]]) -> bool:
    """Move files back, last first; False if one could not be (it stays where it is)."""
    for source, destination in reversed(moves):
        try:
            os.rename(destination, source)
        except OSError:
            return False
    return True
