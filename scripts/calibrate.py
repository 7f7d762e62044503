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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))

import torch  # noqa: E402

from NormativeAnomalyLib.models.package import load_package, write_package  # noqa: E402
from NormativeAnomalyLib.training import calibrate, load_healthy  # noqa: E402


def recalibrate(package_dir: Path, population: Path | None, volumes: list[str], description: str,
                device: str = "cpu", limit: int | None = None) -> None:
    package = load_package(package_dir)
    config = {"calibration_population": str(population) if population else None, "calibration_volumes": volumes}
    healthy = load_healthy(config, "calibration", package.template, package.card["preprocessing"]["normalisation"])
    healthy = healthy[:limit] if limit else healthy  # slow models (diffusion): fewer volumes
    calibration = calibrate(package, healthy, torch.device(device))
    card = dict(package.card, calibration={"data": description, "fpr": list(calibration.fpr),
                                           "threshold": list(calibration.threshold)})
    write_package(package_dir, card, package.state_dict, overwrite=True)
    print(f"{package.name}: threshold at 1% healthy FPR {calibration.threshold_for_fpr(0.01):.4f} "
          f"({len(healthy)} healthy volumes)")


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
    recalibrate(args.package, args.population, args.volumes, args.data, args.device, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
