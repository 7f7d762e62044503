"""Writing a result: the run folder's files (``run_folder`` names them), written as one complete set.

Everything is written into a staging folder beside the output folder and moved in at the
end, so a crash or Cancel leaves either the previous outputs or the complete new set.
An output folder that already holds files is refused unless ``overwrite`` is given, and a
second run into a folder another run is writing is refused (``run_folder.output_lock``).
Whether the folder can be written is checked before any work (``check_output_folder``), not
after it. Files and folders follow the umask, as every other tool's do.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import slicerio

from . import __version__
from .errors import OutputError, one_line, shown
from .model_space import alignment_cutoff, tissue_order_minimum
from .pipeline import AnomalyResult
from .progress import Monitor
from .report import write_report
from .run_folder import (ANOMALY_MAP, ASIDE_MARK, LESION_COLUMNS, LESIONS_CSV, LESIONS_JSON, MAP_FILES, OUTPUT_FILES,
                         PSEUDO_HEALTHY, REPORT, RUN_JSON, SEGMENTATION, SET_ORDER, STAGING_MARK, UNCERTAINTY_MAP,
                         check_output_folder, file_mode, folder_mode, sibling_name, standard_json, unwritable)
from .sitk_guard import is_utf8
from .volume_io import ijk_to_lps, write_image


def write_segmentation(path: Path, result: AnomalyResult) -> None:
    """A .seg.nrrd that 3D Slicer opens as a segmentation node, on the input's grid."""
    mask = result.segmentation.mask.transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    segmentation = slicerio.create_segmentation(mask.shape, ijk_to_lps(result.input_image))
    slicerio.add_segment(segmentation, mask, {"id": "Anomaly", "name": "Anomaly", "color": [1.0, 0.85, 0.1]})
    slicerio.write_segmentation(str(path), segmentation)


def run_summary(result: AnomalyResult, settings: dict[str, Any], maps_only: bool = False) -> dict[str, Any]:
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
                         "skull_stripped": result.skull_stripped,
                         # the scan holds only part of the brain: registered within its field of view
                         "partial_field_of_view": result.partial_field_of_view},
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
        "outputs": list(_set(result, maps_only)),
    }


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def write_outputs(result: AnomalyResult, out_dir: str | os.PathLike, settings: dict[str, Any] | None = None,
                  overwrite: bool = False, extra_summary: dict[str, Any] | None = None,
                  cancel: Callable[[], bool] | None = None, maps_only: bool = False) -> dict[str, Any]:
    """Write the whole set into ``out_dir`` (a link is followed to its folder), or nothing.

    ``maps_only``: run.json and the maps, what a front end reads back (it segments, tabulates and
    reports itself, live). ``cancel`` is asked before each file and before the set is moved in: a Cancel until then
    leaves the folder as it was (Cancelled); once the set is in place it is too late.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    summary = run_summary(result, settings or {}, maps_only) | (extra_summary or {})
    monitor = Monitor(cancel=cancel)
    with _staging(out_dir) as staging:
        try:
            _write_set(result, summary, staging, monitor, maps_only)
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


def _set(result: AnomalyResult, maps_only: bool) -> tuple[str, ...]:
    """The names of the files a run writes."""
    return (MAP_FILES if maps_only else OUTPUT_FILES) + ((UNCERTAINTY_MAP,) if result.uncertainty is not None else ())


def _write_set(result: AnomalyResult, summary: dict[str, Any], staging: Path, monitor: Monitor,
               maps_only: bool) -> None:
    volumes = [(PSEUDO_HEALTHY, result.pseudo_healthy), (ANOMALY_MAP, result.anomaly_map)]
    if result.uncertainty is not None:
        volumes.append((UNCERTAINTY_MAP, result.uncertainty))
    with _itk_names(staging) as itk_folder:  # ITK writes the volumes through a name it can take
        for name, image in volumes:
            monitor.check()
            write_image(image, itk_folder / name)
    if not maps_only:
        _write_tables_and_report(result, staging, monitor)
    (staging / RUN_JSON).write_text(standard_json(summary) + "\n", encoding="utf-8")
    for path in staging.iterdir():
        path.chmod(file_mode())


def _write_tables_and_report(result: AnomalyResult, staging: Path, monitor: Monitor) -> None:
    monitor.check()
    write_segmentation(staging / SEGMENTATION, result)
    rows = [lesion.as_dict() for lesion in result.segmentation.lesions]
    (staging / LESIONS_JSON).write_text(standard_json(rows) + "\n", encoding="utf-8")
    with open(staging / LESIONS_CSV, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(LESION_COLUMNS)
        for lesion in result.segmentation.lesions:
            writer.writerow([lesion.id, lesion.voxels, lesion.volume_ml, lesion.max_score, lesion.mean_score,
                             *lesion.centroid_ras])
    monitor.check()
    write_report(staging / REPORT, result)


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
