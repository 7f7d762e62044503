#!/usr/bin/env python3
"""Batch demo and benchmark: a small cohort through ``normative-anomaly batch`` under torchrun,
then the same command again to show that a rerun resumes (every finished case skipped).

The cohort is the bundled demo case plus shifted, tilted and noised copies of it (seeded,
written to out/batch-cohort/cases/), so registration has real work on every case. Outputs go
to out/batch-cohort/results/ (replaced on each call of this script). Figures on stdout:
cases, workers, seconds in all and per case, and what the rerun skipped.

    python scripts/batch_run.py                           # 6 cases, 2 workers, the default model
    python scripts/batch_run.py --cases 12 --nproc 4 -- --model intensity-t1 --device cpu

Arguments after ``--`` go to ``normative-anomaly batch``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.resources import demo_case

REPO = Path(__file__).resolve().parent.parent
DEMO = demo_case().image


def build_cohort(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """The demo case and ``count - 1`` copies moved by a small rigid transform (up to 5 degrees,
    8 mm) with Gaussian noise (1-3% of the bright end), each on the demo's own grid."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    demo = sitk.ReadImage(str(DEMO), sitk.sitkFloat32)
    bright = float(np.percentile(sitk.GetArrayViewFromImage(demo), 99))
    centre = demo.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2 for size in demo.GetSize()])
    rng = np.random.default_rng(seed)
    paths = [folder / "demo-00.nii.gz"]
    shutil.copy(DEMO, paths[0])
    for number in range(1, count):
        move = sitk.Euler3DTransform(centre, *np.radians(rng.uniform(-5, 5, 3)), tuple(rng.uniform(-8, 8, 3)))
        moved = sitk.Resample(demo, demo, move, sitk.sitkLinear, 0.0)
        values = sitk.GetArrayFromImage(moved)
        values += rng.normal(0.0, rng.uniform(0.01, 0.03) * bright, values.shape).astype(np.float32)
        noisy = sitk.GetImageFromArray(np.clip(values, 0, None))
        noisy.CopyInformation(demo)
        paths.append(folder / f"demo-{number:02d}.nii.gz")
        sitk.WriteImage(noisy, str(paths[-1]))
    return paths


def run_batch(cases: Path, out: Path, nproc: int, extra: list[str]) -> float:
    """``torchrun --standalone --nproc_per_node N -m NormativeAnomalyLib.cli batch ...``; wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "NormativeAnomalyLib.cli", "batch", str(cases), "--out", str(out), *extra]
    print("$ torchrun", " ".join(command[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - start


def summary_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def run_json_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/run.json")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="cohort size (the demo case and copies)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun workers (--nproc_per_node)")
    parser.add_argument("--root", type=Path, default=REPO / "out" / "batch-cohort")
    parser.add_argument("extra", nargs="*", help="after --: more normative-anomaly batch options")
    args = parser.parse_args(argv)
    cases, out = args.root / "cases", args.root / "results"
    build_cohort(cases, args.cases)
    shutil.rmtree(out, ignore_errors=True)

    first = run_batch(cases, out, args.nproc, args.extra)
    rows = summary_rows(out)
    written = run_json_times(out)
    again = run_batch(cases, out, args.nproc, args.extra)
    resumed = summary_rows(out)
    rewritten = sum(run_json_times(out).get(name) != mtime for name, mtime in written.items())

    ok = sum(row["status"] == "ok" for row in rows)
    skipped = sum(row["status"] == "skipped-finished" for row in resumed)
    print(f"\ncases: {len(rows)} ({ok} ok, {len(rows) - ok} failed) on {args.nproc} worker(s)")
    print(f"first run: {first:.1f} s in all (torchrun and imports included), {first / len(rows):.1f} s per case; "
          f"sum of per-case seconds {sum(float(row['seconds']) for row in rows):.1f} s")
    print(f"rerun: {again:.1f} s, {skipped} of {len(resumed)} case(s) skipped as finished, "
          f"{rewritten} output folder(s) rewritten")
    print(f"summary: {out / 'summary.csv'}")
    return 0 if ok == len(rows) and skipped == ok and rewritten == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
