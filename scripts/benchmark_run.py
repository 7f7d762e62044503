#!/usr/bin/env python3
"""Benchmark ``normative-anomaly run`` on a 1 mm MNI-sized T1, on CPU by default.

Each repeat is a fresh subprocess doing what the CLI does (load the model, read the volume,
detect_anomalies, write_outputs into a temp folder), so its peak RSS is that of one user run.
The default input is data/raw/mni152_6thgen/t1.nii.gz (fetched if missing) moved through a
small rigid tilt so registration has work to do. Figures are compared with the targets.

    python scripts/benchmark_run.py                          # 3 repeats, table on stdout
    python scripts/benchmark_run.py --repeats 5 --json --out-json bench.json
    python scripts/benchmark_run.py --input scan.nii.gz --model intensity-t1 --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from NormativeAnomalyLib.options import DEVICES

START = time.perf_counter()  # before the heavy imports: the child's wall includes them, as the CLI's does

REPO = Path(__file__).resolve().parent.parent
STAGES = ("registration", "model_space", "inference", "scoring", "to_input_grid", "segmentation")
ROWS = ("import", "load_model", "read", *STAGES, "write_outputs", "wall")
TARGETS = {"registration": 15.0, "wall": 30.0, "peak_rss_gb": 3.0}  # from the project's performance issue


def child(input_path: str, model: str | None, device: str, out_dir: str) -> None:
    """One CLI-like run; prints its figures as one JSON line on stdout."""
    import torch
    from NormativeAnomalyLib.models import resolve_model
    from NormativeAnomalyLib.outputs import write_outputs
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.volume_io import read_volume

    t = {"import": time.perf_counter() - START}
    mark = time.perf_counter()
    package = resolve_model(model)
    t["load_model"] = time.perf_counter() - mark
    mark = time.perf_counter()
    image = read_volume(input_path)
    t["read"] = time.perf_counter() - mark
    result = detect_anomalies(image, package, RunOptions(device=device))
    t |= {stage: result.seconds.get(stage, math.nan) for stage in STAGES}
    mark = time.perf_counter()
    write_outputs(result, out_dir, {"input": input_path, "model": package.name, "device": device})
    t["write_outputs"] = time.perf_counter() - mark
    t["wall"] = time.perf_counter() - START
    print(json.dumps({"seconds": t, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                      "model": package.name, "device": result.device}))


def tilted_default_input(tmp: Path) -> Path:
    """The MNI152 6th-gen T1 turned ~7 degrees (6 pitch, 2 roll, -3 yaw), shifted 5 mm, on its own grid."""
    import SimpleITK as sitk

    source = REPO / "data" / "raw" / "mni152_6thgen" / "t1.nii.gz"
    if not source.is_file():
        spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
        assert spec is not None and spec.loader is not None
        fetch_data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fetch_data)
        fetch_data.fetch("mni152_6thgen")
    image = sitk.ReadImage(str(source))
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    tilt = sitk.Euler3DTransform(centre, math.radians(6), math.radians(2), math.radians(-3), (3.0, -4.0, 2.0))
    tilted = sitk.Resample(image, image, tilt, sitk.sitkLinear, 0.0)
    path = tmp / "t1_tilted.nii.gz"
    sitk.WriteImage(tilted, str(path))
    return path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from NormativeAnomalyLib.volume_io import read_volume

    input_path = Path(args.input) if args.input else tilted_default_input(tmp)
    header = read_volume(input_path)  # also accepts a DICOM folder, as the CLI does
    runs = []
    for i in range(args.repeats):
        command = [sys.executable, __file__, "--child", "--input", str(input_path), "--device", args.device,
                   "--out-dir", str(tmp / f"out{i}")] + (["--model", args.model] if args.model else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"repeat {i + 1} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"repeat {i + 1}/{args.repeats}: {runs[-1]['seconds']['wall']:.1f} s", file=sys.stderr)
    stages = {row: {"median": statistics.median(r["seconds"][row] for r in runs),
                    "min": min(r["seconds"][row] for r in runs)} for row in ROWS}
    peak_gb = max(r["peak_rss_kb"] for r in runs) * 1024 / 1e9
    figures = {"registration": stages["registration"]["median"], "wall": stages["wall"]["median"],
               "peak_rss_gb": peak_gb}
    first = runs[0]
    return {
        "machine": {"cpu": cpu_model(), "cores_usable": len(os.sched_getaffinity(0)), "torch": first["torch"],
                    "torch_threads": first["torch_threads"]},
        "input": {"path": str(input_path), "size": list(header.GetSize()),
                  "spacing": [round(s, 4) for s in header.GetSpacing()], "tilted_default": not args.input},
        "model": first["model"], "device": first["device"], "repeats": runs, "stages": stages,
        "targets": {k: {"value": figures[k], "target": v, "pass": figures[k] <= v} for k, v in TARGETS.items()},
    }


def print_table(report: dict[str, Any]) -> None:
    m, i = report["machine"], report["input"]
    print(f"machine: {m['cpu']}, {m['cores_usable']} usable core(s), torch {m['torch']} "
          f"({m['torch_threads']} threads)")
    print(f"input:   {i['path']}{' (tilted MNI152)' if i['tilted_default'] else ''}, size {i['size']}, "
          f"spacing {i['spacing']} mm")
    print(f"model:   {report['model']} on {report['device']}, {len(report['repeats'])} fresh-process repeat(s)\n")
    print(f"{'stage':<15}{'median s':>10}{'min s':>10}")
    for row, value in report["stages"].items():
        print(f"{row:<15}{value['median']:>10.2f}{value['min']:>10.2f}")
    print()
    units = {"registration": ("registration (median)", "s"), "wall": ("whole run wall (median)", "s"),
             "peak_rss_gb": ("peak RSS (max)", "GB")}
    for key, check in report["targets"].items():
        label, unit = units[key]
        print(f"{label:<25}{check['value']:>8.2f} {unit:<3} target <= {check['target']:g} {unit:<3} "
              f"{'PASS' if check['pass'] else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="volume to benchmark (default: the tilted MNI152 6th-gen T1)")
    parser.add_argument("--model", help="model name or package folder (default: the registry's default)")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out-json", type=Path, help="also save the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.input, args.model, args.device, args.out_dir)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.model and Path(args.model).is_dir():  # a package folder: the child runs elsewhere
        args.model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="na-bench-") as tmp:
        report = benchmark(args, Path(tmp))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
