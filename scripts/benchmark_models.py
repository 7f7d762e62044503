#!/usr/bin/env python3
"""Seconds per volume for every model, on one 1 mm T1 (the model-zoo issue's cost targets).

The input is registered once and the registration reused, so each model's figures are its
own: "model time" is the inference stage (the network passes; for diffusion models all
DDIM steps and samples), "after registration" adds resampling into model space, scoring,
mapping back and segmentation. Shipped settings unless overridden. Median of --repeats.

    python scripts/benchmark_models.py [--models dae-t1 ddpm-t1 ...] [--device cpu] [--repeats 3]

Targets on 2 CPU cores: AE/VAE/DAE/GAN <= 10 s of model time, diffusion <= 120 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmark_run import cpu_model, tilted_default_input  # the sibling script (this folder is on sys.path)

from NormativeAnomalyLib.options import DEVICES

TARGET_SECONDS = {"ddpm": 120.0, "intensity": None}
DEFAULT_TARGET = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="names or package folders (default: every registered model)")
    parser.add_argument("--input", help="1 mm T1 (default: the tilted MNI152 6th-gen T1)")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from NormativeAnomalyLib.models import available_models, resolve_model
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.registration import register_to_template
    from NormativeAnomalyLib.volume_io import read_volume

    names = args.models or [entry["name"] for entry in available_models()]
    with tempfile.TemporaryDirectory() as tmp:
        image = read_volume(args.input or tilted_default_input(Path(tmp)))
    print(f"input {image.GetSize()} at {image.GetSpacing()[0]:.2g} mm; {cpu_model()}, {os.cpu_count()} core(s), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    registrations = {}
    print(f"{'model':<16}{'family':<10}{'model time (s)':>15}{'after registration (s)':>24}{'target':>10}")
    missed = False
    for name in names:
        package = resolve_model(name)
        key = (package.template.name, package.card["preprocessing"]["registration"])
        if key not in registrations:
            registrations[key] = register_to_template(image, package.template.image, key[1])
        inference, total = [], []
        for _ in range(args.repeats):
            result = detect_anomalies(image, package, RunOptions(device=args.device, registration=registrations[key]))
            inference.append(result.seconds["inference"])
            total.append(result.seconds["total"] - result.seconds["registration"])
        target = TARGET_SECONDS.get(package.family, DEFAULT_TARGET)
        model_time = statistics.median(inference)
        verdict = "-" if target is None else (f"<= {target:.0f} ok" if model_time <= target else f"> {target:.0f} MISSED")
        missed |= target is not None and model_time > target
        print(f"{package.name:<16}{package.family:<10}{model_time:>15.2f}{statistics.median(total):>24.2f}"
              f"{verdict:>10}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
