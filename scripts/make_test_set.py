#!/usr/bin/env python3
"""Build the synthetic evaluation set from anatomies held out of training and calibration.

    python scripts/make_test_set.py [--out data/testset] [--per-kind 3]
    python scripts/make_test_set.py --modality T2          # -> data/testset_t2

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

T2 (``--modality T2``, into data/testset_t2 with a README.md): only two T2 anatomies exist
offline, ICBM 2009c (the T2 model's template and training anatomy) and MNI avg152 (its
calibration anatomy). The test set is made from avg152 T2 (2 mm, with skull; brain mask: the
template's, mapped through an affine registration), tilted, resampled to 1.5 mm and given
Rician noise exactly as MNI152 is for T1: the same lesion kinds and seeds, and two healthy
variants. It is less independent than T1's (shared with calibration) and has no real head.
The lesion kinds are the simulator's as they are, so on T2 the hyperintense mass is the
typical appearance (tumour, oedema, infarct, MS plaque), while multifocal and territorial
lesions stay hypointense, which is not how MS plaques or infarcts look on T2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent

from NormativeAnomalyLib.input_space import to_input_grid
from NormativeAnomalyLib.registration import register_to_template
from NormativeAnomalyLib.simulation import LESION_KINDS, simulate_lesion
from NormativeAnomalyLib.templates import load_template, resample_to_grid
from NormativeAnomalyLib.volume_io import read_volume

SEED = 100000


def tilted_mni152(rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    raw = REPO / "data" / "raw" / "mni152_6thgen"
    t1 = sitk.ReadImage(str(raw / "t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(raw / "brain_mask.nii.gz"), sitk.sitkFloat32)
    return tilted(t1, brain, rng)


def avg152_t2() -> tuple[sitk.Image, sitk.Image]:
    """MNI avg152 T2 (with skull) and the T2 template's brain mask mapped onto its grid (float, 0..1)."""
    t2 = read_volume(REPO / "data" / "raw" / "avg152" / "t2.nii")
    template = load_template("icbm152_2009c_t2_2mm")
    registration = register_to_template(t2, template.image, "affine")
    brain = to_input_grid(sitk.GetArrayFromImage(template.brain_mask).astype(np.float32), template, registration, t2)
    return t2, brain


def tilted(source: sitk.Image, brain: sitk.Image, rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """``source`` (T1 or T2) as a patient scan: a random tilt and shift, 1.5 mm, brain p99 = 1000."""
    tilt = sitk.Euler3DTransform()
    tilt.SetCenter(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()]))
    tilt.SetRotation(*np.deg2rad(rng.uniform(-8, 8, 3)))
    tilt.SetTranslation(rng.uniform(-6, 6, 3).tolist())
    size, spacing = (116, 140, 116), (1.5, 1.5, 1.5)
    image = resample_to_grid(source, size, spacing, tilt)
    mask = sitk.GetArrayFromImage(resample_to_grid(brain, size, spacing, tilt)) > 0.5
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


T2_README = """# T2 test set (synthetic): read before quoting its figures

Made by `scripts/make_test_set.py --modality T2` from **MNI avg152 T2** (SPM runtime package,
GPL-2.0; the avg152 templates derive from MNI data under the MNI notice), read at build time only.

- Only two T2 anatomies can be had offline: ICBM 2009c (the T2 model's template and its only
  training anatomy) and avg152. avg152 is also the T2 **calibration** anatomy
  (`scripts/build_population.py --modality T2`), so the thresholds were set on variants of
  the same anatomy these cases come from: T2 figures are less independent than T1's, whose
  test anatomies are held out of calibration too. There is no real single-subject T2 head.
- avg152 is an affine-registered average of 152 brains at 2 mm: much blurrier than the
  nonlinear ICBM 2009c the model learned from. Each case is tilted and shifted at random,
  resampled to 1.5 mm (116x140x116), scaled so the brain's 99th percentile (CSF on T2) is
  1000, and given Rician noise (sigma 25, as the T1 set).
- Lesion kinds are the simulator's, unchanged: `hyperintense` (mass, 25-60% brighter) is the
  typical T2 appearance of tumours, oedema, infarcts and MS plaques; `hypointense` (mass)
  fits haemorrhage, calcification or flow voids; `isointense` is mass effect only;
  `multifocal` (MS-like) and `territorial` (stroke-like) are **hypointense** here, which is
  not how MS plaques or infarcts look on T2: read those rows as dark-lesion detection.
- Healthy scans: two avg152 variants (no mask).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=["T1", "T2"], default="T1")
    parser.add_argument("--out", type=Path, default=None, help="default: data/testset (T1), data/testset_t2 (T2)")
    parser.add_argument("--per-kind", type=int, default=3)
    args = parser.parse_args(argv)
    t2 = args.modality == "T2"
    out = args.out if args.out is not None else REPO / "data" / ("testset_t2" if t2 else "testset")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if t2:
        source = avg152_t2()
        anatomies = ("avg152",)
    else:
        head, head_brain = real_head()
        anatomies = ("mni152", "realhead")
    for anatomy in anatomies:
        for kind in LESION_KINDS:
            for index in range(args.per_kind):
                seed = SEED + len(rows)
                rng = np.random.default_rng(seed)
                if anatomy == "mni152":
                    image, brain = tilted_mni152(rng)
                elif anatomy == "avg152":
                    image, brain = tilted(*source, rng)
                else:
                    image, brain = head, head_brain
                values = sitk.GetArrayFromImage(image).astype(np.float32)
                spacing_zyx = tuple(reversed(image.GetSpacing()))
                lesion = simulate_lesion(kind, values, brain, spacing_zyx, rng)
                # The real head has its own noise; the template-derived ones get scanner-like noise.
                final = lesion.image if anatomy == "realhead" else rician(lesion.image, 25.0, rng)
                case = f"{anatomy}_{kind}_{index}"
                save(final, image, out / f"{case}_image.nii.gz")
                save(lesion.mask.astype(np.uint8), image, out / f"{case}_mask.nii.gz", sitk.sitkUInt8)
                rows.append({"case": case, "type": kind, "anatomy": anatomy, "seed": seed})
                print(case, f"{lesion.mask.sum() * np.prod(image.GetSpacing()) / 1000:.2f} mL", flush=True)
    healthy_anatomy = anatomies[0]
    for index in range(2):
        seed = SEED + 900 + index
        rng = np.random.default_rng(seed)
        image, _ = tilted(*source, rng) if t2 else tilted_mni152(rng)
        save(rician(sitk.GetArrayFromImage(image), 25.0, rng), image,
             out / f"{healthy_anatomy}_healthy_{index}_image.nii.gz")
        rows.append({"case": f"{healthy_anatomy}_healthy_{index}", "type": "healthy", "anatomy": healthy_anatomy,
                     "seed": seed})
    if t2:
        (out / "README.md").write_text(T2_README)
    else:
        sitk.WriteImage(head, str(out / "realhead_healthy_image.nii.gz"), useCompression=True)
        rows.append({"case": "realhead_healthy", "type": "healthy", "anatomy": "realhead (real scan)", "seed": ""})
        tiny = read_volume(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")
        sitk.WriteImage(tiny, str(out / "nibabel_healthy_image.nii.gz"), useCompression=True)
        rows.append({"case": "nibabel_healthy", "type": "healthy", "anatomy": "nibabel anatomical (real scan)",
                     "seed": ""})
    with open(out / "cases.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case", "type", "anatomy", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} cases to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
