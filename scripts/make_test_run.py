#!/usr/bin/env python3
"""Testing/Data/demo_run: a small finished run for the torch-free tests (the Slicer self-test's
and the MRML layer's): the demo case resampled to 3 mm as ``input.nii.gz``, and what
``normative-anomaly run`` wrote for it with the default model (run.json and the two maps).

    python scripts/make_test_run.py [--out Testing/Data/demo_run]

The run's temporary paths are left out of run.json; everything else is as the CLI wrote it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

from NormativeAnomalyLib.resources import demo_case
from NormativeAnomalyLib.run_folder import MAP_FILES, RUN_JSON

REPO = Path(__file__).resolve().parent.parent
SPACING_MM = 3.0


def resampled_demo(spacing: float) -> sitk.Image:
    demo = sitk.ReadImage(str(demo_case().image))
    size = [round(n * s / spacing) for n, s in zip(demo.GetSize(), demo.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(demo, spacing / 2.355)  # against aliasing
    resampled = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, demo.GetOrigin(), [spacing] * 3,
                              demo.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.Cast(sitk.Round(resampled), demo.GetPixelID())  # stored as the demo is (int16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "Data" / "demo_run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        input_path = Path(work) / "input.nii.gz"
        sitk.WriteImage(resampled_demo(SPACING_MM), str(input_path), useCompression=True)
        run_dir = Path(work) / "run"
        subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "run", str(input_path), "--out",
                        str(run_dir), "--quiet", "--maps-only"], check=True)  # what a GUI's run writes
        summary = json.loads((run_dir / RUN_JSON).read_text())
        summary["input"] = summary["settings"]["input"] = "input.nii.gz"
        summary["model"]["path"] = summary["model"]["name"]
        (run_dir / RUN_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        shutil.copy(input_path, args.out / "input.nii.gz")
        for name in MAP_FILES:
            shutil.copy(run_dir / name, args.out / name)
    print(f"{args.out}: " + ", ".join(f"{p.name} {p.stat().st_size // 1024} KB" for p in sorted(args.out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
