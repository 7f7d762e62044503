#!/usr/bin/env python3
"""(Re)calibrate a model package on healthy data: its card's healthy false-positive-rate table.

    python scripts/calibrate.py PACKAGE_DIR --population data/population/calibration.npy --data "description"
    python scripts/calibrate.py PACKAGE_DIR --volumes healthy1.nii.gz healthy2.nii.gz --data "my site's controls"

Volumes are registered to the model's template and prepared exactly as at inference; a
population is already prepared (scripts/build_population.py). The anomaly maps come from
the package's own inference and scoring code. Calibrating on a site's own healthy scans
makes the thresholds mean what they say on that site's scanner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from NormativeAnomalyLib.training.calibration import recalibrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--population", type=Path)
    parser.add_argument("--volumes", nargs="*", default=[])
    parser.add_argument("--data", required=True, help="what the healthy data is (goes into the card)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, help="use only the first N healthy volumes (for slow models)")
    args = parser.parse_args(argv)
    if not args.population and not args.volumes:
        parser.error("give --population or --volumes")
    calibration = recalibrate(args.package, args.population, args.volumes, args.data, args.device, args.limit)
    print(f"{args.package}: threshold at 1% healthy FPR {calibration.threshold_for_fpr(0.01):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
