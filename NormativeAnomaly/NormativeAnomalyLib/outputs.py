"""Writing a result: the file names scripts rely on, written as one complete set.

Everything is written into a staging folder beside the output folder and moved in at the
end, so a crash or Cancel leaves either the previous outputs or the complete new set.
An output folder that already holds files is refused unless ``overwrite`` is given.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import slicerio

from . import __version__
from .errors import OutputError
from .pipeline import AnomalyResult
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
        "registration": {"kind": result.registration.kind, "final_metric": _finite(result.registration.metric)},
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
