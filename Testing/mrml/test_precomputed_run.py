"""The shipped finished run (Testing/Data/demo_run, made by scripts/make_test_run.py) through the
path a run's results take, on a real MRML scene and without PyTorch: what the Slicer self-test's
torch-free part does in Slicer, where its harness has neither PyTorch nor MONAI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

pytest.importorskip("slicer")

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "Testing" / "Data" / "demo_run"

SCRIPT = r"""
import builtins, json, sys, tempfile
real_import = builtins.__import__
def no_torch(name, *args, **kwargs):  # as in Slicer's process: torch and MONAI are not there
    if name.split(".")[0] in ("torch", "monai"):
        raise ImportError(f"{name} is not available here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_torch

from NormativeAnomalyLib.mrml import load_run
from NormativeAnomalyLib.mrml.export import export_result
from NormativeAnomalyLib.mrml.lesion_table import read_lesion_table
from NormativeAnomalyLib.mrml.scene import create_scene
from NormativeAnomalyLib.mrml.volumes import load_volume_file
from NormativeAnomalyLib.run_folder import read_run_folder

folder = sys.argv[1]
standalone = create_scene()
volume = load_volume_file(standalone.scene, folder + "/input.nii.gz", "input")
nodes, live = load_run(standalone.scene, volume, read_run_folder(folder), color_logic=standalone.color_logic)
first = int(live.current.mask.sum())
live.update(threshold=nodes.threshold * 0.6)
lowered = live.current
live.set_rejected(lowered.lesions[0].id, True)
exported = export_result(nodes, tempfile.mkdtemp())
print(json.dumps({"first": first, "threshold": nodes.threshold, "lowered": int(lowered.mask.sum()),
                  "after_reject": int(live.current.mask.sum()), "rows": len(read_lesion_table(nodes.lesion_table)),
                  "exported": sorted(p.name for p in exported),
                  "torch": [m for m in ("torch", "monai") if m in sys.modules]}))
"""


def thresholded_voxels(threshold: float, min_mm3: float) -> int:
    image = sitk.ReadImage(str(RUN / "anomaly_map.nii.gz"))
    values = sitk.GetArrayFromImage(image)
    components, count = ndimage.label(values > threshold, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1) * float(np.prod(image.GetSpacing()))
    keep = np.flatnonzero(sizes >= max(min_mm3, 1e-9))
    return int(np.isin(components, keep[keep > 0]).sum())


def test_the_shipped_run_loads_and_drives_without_torch():
    summary = json.loads((RUN / "run.json").read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(RUN)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["torch"] == []
    assert seen["first"] == thresholded_voxels(summary["threshold"], summary["min_lesion_mm3"]) > 0
    assert seen["lowered"] == thresholded_voxels(seen["threshold"], summary["min_lesion_mm3"]) > seen["first"]
    assert 0 < seen["after_reject"] < seen["lowered"] and seen["rows"] > 0
    assert "anomalies.seg.nrrd" in seen["exported"] and "lesions.csv" in seen["exported"]


def test_the_shipped_run_is_what_the_cli_wrote_for_its_input():
    """Maps on the input's grid, and run.json with no path of the machine that made it."""
    summary = json.loads((RUN / "run.json").read_text())
    assert summary["input"] == "input.nii.gz" and not Path(summary["model"]["path"]).is_absolute()
    reference = sitk.ReadImage(str(RUN / "input.nii.gz"))
    for name in ("anomaly_map.nii.gz", "pseudo_healthy.nii.gz"):
        image = sitk.ReadImage(str(RUN / name))
        assert image.GetSize() == reference.GetSize()
        assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
