"""Writing a result: the file names scripts rely on, written as one complete set.

Everything is written into a staging folder beside the output folder and moved in at the
end, so a crash or Cancel leaves either the previous outputs or the complete new set.
An output folder that already holds files is refused unless ``overwrite`` is given, and a
second run into a folder another run is writing is refused (``output_lock``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import slicerio

from . import __version__
from .errors import OutputError
from .pipeline import MIN_ALIGNMENT, AnomalyResult
from .report import write_report
from .volume_io import ijk_to_lps, write_image

OUTPUT_FILES = ("pseudo_healthy.nii.gz", "anomaly_map.nii.gz", "anomalies.seg.nrrd", "lesions.csv", "lesions.json",
                "report.png", "run.json")
# Written only by models that give one (diffusion with several samples).
OPTIONAL_OUTPUT_FILES = ("uncertainty_map.nii.gz",)
LESION_COLUMNS = ("id", "voxels", "volume_ml", "max_score", "mean_score", "centroid_r", "centroid_a", "centroid_s")


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder whose contents would be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir} is not empty; choose another --out or pass --overwrite")


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for a whole run, or refuse at once.

    Two runs into one folder would each pass the empty-folder check, compute for minutes, and
    the second would then replace the first's files with a set that mixes nothing but is not
    what the first user asked for. The lock is an OS file lock (``flock``) on a hidden file
    beside the folder: it dies with its process, so a crash never leaves a stale lock behind.
    """
    out_dir = Path(out_dir).absolute()
    created = [folder for folder in [out_dir.parent, *out_dir.parent.parents] if not folder.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.normative-anomaly.lock"
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(handle)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "?"
            os.close(handle)
            raise OutputError(f"another run (process {holder}) is writing to {out_dir}; wait for it to finish "
                              "or choose another --out") from None
        try:  # the holder we waited on may have removed the file: then lock the new one
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)  # closing releases the lock
        for folder in created:  # a failed run leaves no new empty parent folders behind
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
                         "alignment": _finite(round(result.alignment, 4)), "alignment_cutoff": MIN_ALIGNMENT},
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
                  overwrite: bool = False, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    summary = run_summary(result, settings or {}) | (extra_summary or {})
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_image(result.pseudo_healthy, staging / "pseudo_healthy.nii.gz")
        write_image(result.anomaly_map, staging / "anomaly_map.nii.gz")
        if result.uncertainty is not None:
            write_image(result.uncertainty, staging / "uncertainty_map.nii.gz")
        write_segmentation(staging / "anomalies.seg.nrrd", result)
        rows = [l.as_dict() for l in result.segmentation.lesions]
        (staging / "lesions.json").write_text(json.dumps(rows, indent=2) + "\n")
        with open(staging / "lesions.csv", "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(LESION_COLUMNS)
            for lesion in result.segmentation.lesions:
                writer.writerow([lesion.id, lesion.voxels, lesion.volume_ml, lesion.max_score, lesion.mean_score,
                                 *lesion.centroid_ras])
        write_report(staging / "report.png", result)
        (staging / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(staging, out_dir)  # the whole set appears at once
        return
    for name in OUTPUT_FILES + OPTIONAL_OUTPUT_FILES:  # --overwrite: replace ours, leave the user's others alone
        if (staging / name).exists():
            os.replace(staging / name, out_dir / name)
        elif name in OPTIONAL_OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)  # from an earlier run: it would not match this one
    shutil.rmtree(staging, ignore_errors=True)
