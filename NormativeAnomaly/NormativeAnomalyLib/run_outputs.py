"""What a front end needs to show a finished run, read back from its output folder.

The Slicer module and the web app run the CLI in a background process and read its output
folder; both hand a ``RunOutputs`` to the MRML layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .errors import OutputError
from .scoring import Calibration

MODEL_FIELDS = ("name", "version", "family", "modality", "description", "license", "training_data")


@dataclass
class RunOutputs:
    pseudo_healthy: sitk.Image  # on the input's grid
    anomaly_map: sitk.Image  # on the input's grid
    calibration: Calibration  # healthy false-positive rate <-> threshold
    threshold: float
    min_lesion_mm3: float
    model: dict[str, Any]  # MODEL_FIELDS of the card
    uncertainty: sitk.Image | None = None  # variance over stochastic reconstructions (diffusion), on the input's grid


def read_run_folder(out_dir: str | os.PathLike) -> RunOutputs:
    """Read the maps and settings that ``normative-anomaly run`` wrote into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        summary = json.loads((out_dir / "run.json").read_text())
        calibration = Calibration(tuple(summary["calibration"]["fpr"]), tuple(summary["calibration"]["threshold"]))
        threshold, min_size = float(summary["threshold"]), float(summary["min_lesion_mm3"])
        model = {key: summary["model"].get(key, "") for key in MODEL_FIELDS}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(f"{out_dir} does not hold a complete run (run.json: {error})") from error
    uncertainty_path = out_dir / "uncertainty_map.nii.gz"
    return RunOutputs(_read_map(out_dir / "pseudo_healthy.nii.gz"), _read_map(out_dir / "anomaly_map.nii.gz"),
                      calibration, threshold, min_size, model,
                      _read_map(uncertainty_path) if uncertainty_path.exists() else None)


def _read_map(path: Path) -> sitk.Image:
    # Our own output, so no input checks (an all-zero anomaly map is a valid result).
    try:
        return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    except RuntimeError as error:
        raise OutputError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}") from None
