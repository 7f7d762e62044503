#!/usr/bin/env python3
"""Build the synthetic evaluation set from anatomies held out of training and calibration.

    python scripts/make_test_set.py [--out data/testset] [--per-kind 3]

Writes <case>_image.nii.gz, <case>_mask.nii.gz (lesion cases only) and cases.csv
(case, type, anatomy, seed) in the layout scripts/evaluate.py reads:
- FSL MNI152 (6th generation) T1 with skull, resampled to 1.5 mm through a random tilt and
  shift, with Rician noise (as the demo case, with other seeds);
- the real single-subject head (Testing/Data/itk_kmeans_t1.nii.gz, 2x2x3 mm, real noise),
  lesions simulated on its own grid inside the template's brain mask mapped onto it.
Each of hypointense, hyperintense, isointense (mass effect only), multifocal (MS-like) and
territorial (stroke-like) lesions, ``--per-kind`` cases per anatomy; plus healthy scans
(no mask): two MNI152 variants, the real head and the small real nibabel T1.
Seeds start at 100000: disjoint from the population (< 10000) and the demo case.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))
sys.path.insert(0, str(REPO / "scripts"))

from build_resources import _resample_to_grid  # noqa: E402
from NormativeAnomalyLib.input_space import to_input_grid  # noqa: E402
from NormativeAnomalyLib.registration import register_to_template  # noqa: E402
from NormativeAnomalyLib.simulation import LESION_KINDS, simulate_lesion  # noqa: E402
from NormativeAnomalyLib.templates import load_template  # noqa: E402
from NormativeAnomalyLib.volume_io import read_volume  # noqa: E402

SEED = 100000


def tilted_mni152(rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    raw = REPO / "data" / "raw" / "mni152_6thgen"
    t1 = sitk.ReadImage(str(raw / "t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(raw / "brain_mask.nii.gz"), sitk.sitkFloat32)
    tilt = sitk.Euler3DTransform()
    tilt.SetCenter(t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()]))
    tilt.SetRotation(*np.deg2rad(rng.uniform(-8, 8, 3)))
    tilt.SetTranslation(rng.uniform(-6, 6, 3).tolist())
    size, spacing = (116, 140, 116), (1.5, 1.5, 1.5)
    image = _resample_to_grid(t1, size, spacing, tilt)
    mask = sitk.GetArrayFromImage(_resample_to_grid(brain, size, spacing, tilt)) > 0.5
    values = sitk.GetArrayFromImage(image)
    values *= 1000.0 / np.percentile(values[mask], 99)
    reference = sitk.GetImageFromArray(values)
    reference.CopyInformation(image)
    return reference, mask


def real_head() -> tuple[sitk.Image, np.ndarray]:
    head = read_volume(REPO / "Testing" / "Data" / "itk_kmeans_t1.nii.gz")
    template = load_template("icbm152_2009c_t1_2mm")
    registration = register_to_template(head, template.image, "affine")
    mask = to_input_grid(sitk.GetArrayFromImage(template.brain_mask).astype(np.float32), template, registration,
                         head, sitk.sitkNearestNeighbor)
    return head, sitk.GetArrayFromImage(mask) > 0.5


def rician(values: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.hypot(values + rng.normal(0, sigma, values.shape), rng.normal(0, sigma, values.shape))


def save(image: np.ndarray, like: sitk.Image, path: Path, pixel=sitk.sitkFloat32) -> None:
    out = sitk.GetImageFromArray(image)
    out.CopyInformation(like)
    sitk.WriteImage(sitk.Cast(out, pixel), str(path), useCompression=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "testset")
    parser.add_argument("--per-kind", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    head, head_brain = real_head()
    for anatomy in ("mni152", "realhead"):
        for kind in LESION_KINDS:
            for index in range(args.per_kind):
                seed = SEED + len(rows)
                rng = np.random.default_rng(seed)
                if anatomy == "mni152":
                    image, brain = tilted_mni152(rng)
                else:
                    image, brain = head, head_brain
                values = sitk.GetArrayFromImage(image).astype(np.float32)
                spacing_zyx = tuple(reversed(image.GetSpacing()))
                lesion = simulate_lesion(kind, values, brain, spacing_zyx, rng)
                # The real head has its own noise; the template-derived one gets scanner-like noise.
                final = rician(lesion.image, 25.0, rng) if anatomy == "mni152" else lesion.image
                case = f"{anatomy}_{kind}_{index}"
                save(final, image, args.out / f"{case}_image.nii.gz")
                save(lesion.mask.astype(np.uint8), image, args.out / f"{case}_mask.nii.gz", sitk.sitkUInt8)
                rows.append({"case": case, "type": kind, "anatomy": anatomy, "seed": seed})
                print(case, f"{lesion.mask.sum() * np.prod(image.GetSpacing()) / 1000:.2f} mL", flush=True)
    for index in range(2):
        seed = SEED + 900 + index
        rng = np.random.default_rng(seed)
        image, _ = tilted_mni152(rng)
        save(rician(sitk.GetArrayFromImage(image), 25.0, rng), image, args.out / f"mni152_healthy_{index}_image.nii.gz")
        rows.append({"case": f"mni152_healthy_{index}", "type": "healthy", "anatomy": "mni152", "seed": seed})
    sitk.WriteImage(head, str(args.out / "realhead_healthy_image.nii.gz"), useCompression=True)
    rows.append({"case": "realhead_healthy", "type": "healthy", "anatomy": "realhead (real scan)", "seed": ""})
    tiny = read_volume(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")
    sitk.WriteImage(tiny, str(args.out / "nibabel_healthy_image.nii.gz"), useCompression=True)
    rows.append({"case": "nibabel_healthy", "type": "healthy", "anatomy": "nibabel anatomical (real scan)", "seed": ""})
    with open(args.out / "cases.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case", "type", "anatomy", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
