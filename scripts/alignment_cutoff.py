#!/usr/bin/env python3
"""The alignment check's cut-off, measured: correlation of each registered input with the T1
template over the brain (``model_space.alignment_quality``) for inputs that should pass (real
and template-derived T1 heads) and inputs that should not (non-brain, noise, a label map, heads
stored upside down or back to front, other contrasts).

    python scripts/alignment_cutoff.py [--out docs/alignment.md]

Uses data/raw (scripts/fetch_data.py) where present, and the files shipped in the repository.
Prints one row per input and whether the shipped cut-off (pipeline.MIN_ALIGNMENT) separates them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))

from NormativeAnomalyLib.errors import NormativeAnomalyError  # noqa: E402
from NormativeAnomalyLib.model_space import prepare_model_input  # noqa: E402
from NormativeAnomalyLib.pipeline import MIN_ALIGNMENT  # noqa: E402
from NormativeAnomalyLib.registration import register_to_template  # noqa: E402
from NormativeAnomalyLib.simulation import chest_phantom  # noqa: E402
from NormativeAnomalyLib.templates import load_template  # noqa: E402
from NormativeAnomalyLib.volume_io import validate_volume  # noqa: E402

RAW = REPO / "data" / "raw"
NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}


def flipped(image: sitk.Image, axis: int) -> sitk.Image:
    """The voxels mirrored along ``axis`` (numpy z, y, x) with the header kept: a wrong orientation."""
    values = np.flip(sitk.GetArrayFromImage(image), axis=axis).copy()
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


def cases(template) -> list[tuple[str, str, sitk.Image]]:
    """(name, expected "pass"/"refuse", image)."""
    read = lambda path: sitk.ReadImage(str(path), sitk.sitkFloat32)  # noqa: E731
    head = read(REPO / "Testing" / "Data" / "itk_kmeans_t1.nii.gz")
    found = [("real T1 head, 2x2x3 mm (ITK KmeansTest)", "pass", head),
             ("demo case (template-derived, with a lesion)", "pass", read(REPO / "Resources/SampleData/demo_t1.nii.gz"))]
    for name, path in [("Colin27 T1 (brain only)", "colin27/t1_brain.nii"), ("OASIS-30 T1 template", "oasis30/t1.nii.gz"),
                       ("MNI152 6th gen T1", "mni152_6thgen/t1.nii.gz")]:
        if (RAW / path).is_file():
            found.append((name, "pass", read(RAW / path)))
    moved = sitk.Euler3DTransform()
    moved.SetTranslation((6.0, -4.0, 5.0))
    moved.SetRotation(0.1, 0.0, 0.05)
    t2 = load_template("icbm152_2009c_t2_2mm").image
    found += [
        ("ICBM 2009c T2 (other contrast), moved", "refuse", sitk.Resample(t2, t2, moved, sitk.sitkLinear, 0.0)),
        ("chest-CT-like phantom", "refuse", chest_phantom()),
        ("uniform noise", "refuse", _noise()),
        ("brain mask given as the image", "refuse",
         sitk.Resample(sitk.Cast(template.brain_mask, sitk.sitkFloat32), template.image, moved,
                       sitk.sitkNearestNeighbor, 0.0)),
        ("real head stored back to front (A-P flipped voxels)", "refuse", flipped(head, 1)),
        ("real head stored upside down (S-I flipped voxels)", "refuse", flipped(head, 0)),
        ("small partial field of view, 66x82x50 mm (nibabel anatomical)", "refuse",
         read(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")),
    ]
    for name, path in [("avg152 T2", "avg152/t2.nii"), ("avg152 PD", "avg152/pd.nii"),
                       ("samseg 20-subject template (inverted, T2-like contrast)", "samseg20/t1.nii.gz")]:
        if (RAW / path).is_file():
            found.append((name, "refuse", read(RAW / path)))
    return found


def _noise() -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((60, 80, 70)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    template = load_template("icbm152_2009c_t1_2mm")
    rows, wrong = [], 0
    for name, expected, image in cases(template):
        try:  # what a run does first: the input checks, registration, model space
            validate_volume(image)
            registration = register_to_template(image, template.image)
            alignment, note = prepare_model_input(image, template, registration, NORMALISATION).alignment, ""
        except NormativeAnomalyError as error:  # refused before the alignment check
            alignment, note = float("nan"), f"(refused before the check: {error})"
        passed = bool(alignment >= MIN_ALIGNMENT)
        verdict = "ok" if passed == (expected == "pass") else "WRONG"
        wrong += verdict == "WRONG"
        rows.append(f"| {name} | {expected} | {alignment:+.3f} | {'passes' if passed else 'refused'} | {verdict} {note}|")
        print(rows[-1], flush=True)
    table = ["| input | should | correlation | at cut-off " + str(MIN_ALIGNMENT) + " | |", "|---|---|---|---|---|"] + rows
    if args.out:
        args.out.write_text("# Alignment check: measured correlations\n\nMade by `scripts/alignment_cutoff.py`."
                            " Correlation of the registered input with the ICBM 2009c T1 template over its brain.\n\n"
                            + "\n".join(table) + "\n")
    print(f"{len(rows) - wrong} of {len(rows)} inputs on the right side of the cut-off {MIN_ALIGNMENT} "
          "(or refused before it)")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
