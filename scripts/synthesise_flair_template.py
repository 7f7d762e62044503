#!/usr/bin/env python3
"""A FLAIR-like template from the ICBM 2009c T1 and T2 templates (no FLAIR template exists offline).

    python scripts/synthesise_flair_template.py [--out Resources/Templates]

Inside the brain, voxels are given soft memberships of three tissue classes (CSF, grey and
white matter) by fuzzy c-means on the (T1, T2) intensity pairs; the FLAIR-like image is the
membership-weighted mean of typical FLAIR tissue levels: CSF suppressed, grey matter a little
brighter than white matter, no white-matter lesions. Outside the brain it is the T1 template
scaled down (scalp fat is bright on both). Synthetic: say so wherever it is used.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.templates import load_template, write_template

NAME = "icbm152_2009c_flair_2mm"
# Typical FLAIR levels relative to white matter (CSF nulled by the inversion pulse).
FLAIR_LEVELS = {"csf": 0.25, "grey": 1.25, "white": 1.0}
OUTSIDE_BRAIN = 0.8  # times the T1 template's level, relative to white matter


def tissue_memberships(t1: np.ndarray, t2: np.ndarray, iterations: int = 30) -> dict[str, np.ndarray]:
    """Fuzzy c-means (m = 2) with three classes on brain voxels' (T1, T2), each scaled to its
    1st-99th percentile; classes named by their centres: CSF darkest on T1, white matter brightest."""
    features = np.stack([(v - np.percentile(v, 1)) / np.ptp(np.percentile(v, [1, 99])) for v in (t1, t2)], axis=1)
    centres = np.percentile(features, [10, 50, 90], axis=0)  # deterministic start
    centres[:, 1] = centres[::-1, 1]  # T2 runs the other way: CSF bright
    for _ in range(iterations):
        distance = np.linalg.norm(features[:, None, :] - centres[None], axis=2) + 1e-6
        weights = 1.0 / distance ** 2
        memberships = weights / weights.sum(axis=1, keepdims=True)
        centres = (memberships[:, :, None] ** 2 * features[:, None, :]).sum(0) / (memberships ** 2).sum(0)[:, None]
    order = np.argsort(centres[:, 0])  # by T1: CSF, grey, white
    return {name: memberships[:, k] for name, k in zip(("csf", "grey", "white"), order)}


def synthesise(t1_template, t2_template) -> sitk.Image:
    t1 = sitk.GetArrayFromImage(t1_template.image).astype(np.float64)
    t2 = sitk.GetArrayFromImage(t2_template.image).astype(np.float64)
    brain = sitk.GetArrayFromImage(t1_template.brain_mask).astype(bool)
    memberships = tissue_memberships(t1[brain], t2[brain])
    white_t1 = float(np.percentile(t1[brain], 95))
    flair = OUTSIDE_BRAIN * t1 / white_t1
    flair[brain] = sum(FLAIR_LEVELS[name] * memberships[name] for name in FLAIR_LEVELS)
    image = sitk.GetImageFromArray(np.clip(flair * 600, 0, 1000).astype(np.int16))
    image.CopyInformation(t1_template.image)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Templates")
    args = parser.parse_args(argv)
    t1, t2 = load_template("icbm152_2009c_t1_2mm"), load_template("icbm152_2009c_t2_2mm")
    folder = args.out / NAME
    write_template(folder, NAME, synthesise(t1, t2), t1.brain_mask,
                   "FLAIR-like contrast synthesised from the ICBM 2009c nonlinear symmetric T1 and T2 templates "
                   "(fuzzy c-means tissue memberships; CSF suppressed; no lesions) and the ICBM brain mask, 2 mm, "
                   "96x112x96. Synthetic: no FLAIR template exists offline",
                   {"derived_from": ["icbm152_2009c_t1_2mm", "icbm152_2009c_t2_2mm"],
                    "script": "scripts/synthesise_flair_template.py", "licence": "Resources/Licenses/MNI-ICBM152.txt"})
    shutil.copy(t1.folder / "LICENSE.txt", folder / "LICENSE.txt")
    print(f"template: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
