#!/usr/bin/env python3
"""The alignment check's cut-offs, measured per contrast: correlation of each registered input
with the T1, T2 or FLAIR-like template over the brain (``model_space.alignment_quality``) for inputs that
should pass (real and template-derived heads, real skull-stripped BraTS scans with tumours, crops and
slabs of real scans) and inputs that should not (non-brain, noise, a label map, scans stored upside
down or back to front, other contrasts, fields of view holding too little brain).

    python scripts/alignment_cutoff.py [--out docs/alignment.md] [--brats ../shared/data/brats-dev]
                                    [--contrasts T1 T2 FLAIR] [--render]

Each input goes through what a run does first (skull detection, registration to the template or,
for a skull-stripped input, to its brain, the model-space steps). Uses data/raw (scripts/fetch_data.py) and the BraTS development cases where present, and the files
shipped in the repository. Prints one row per input and whether the shipped cut-off
(model_space.alignment_cutoff) separates them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent

from NormativeAnomalyLib.errors import NormativeAnomalyError, RegistrationError
from NormativeAnomalyLib.evaluation import ACQUISITIONS
from NormativeAnomalyLib.model_space import (MIN_BRAIN_OVERLAP, TISSUE_BAND_EROSION, TISSUE_ORDER_MINIMA,
                                             alignment_cutoff, check_alignment, prepare_model_input)
from NormativeAnomalyLib.pipeline import RunOptions, input_brain_mask
from NormativeAnomalyLib.registration import PARTIAL_FIELD_OF_VIEW, register_scan
from NormativeAnomalyLib.resources import demo_case
from NormativeAnomalyLib.simulation import chest_phantom
from NormativeAnomalyLib.templates import load_template
from NormativeAnomalyLib.training.scans import LESION_SUFFIX
from NormativeAnomalyLib.volume_io import validate_volume

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
             ("demo case (template-derived, with a lesion)", "pass", read(demo_case().image))]
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
        ("real T1, a partial field of view: 66x82x50 mm of the central brain (nibabel anatomical)", "pass",
         read(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")),
        # Partial fields of view that hold too little brain to place: the head's back 36 mm (its voxel
        # axis 2 runs from the back), three 3 mm slices through its middle.
        ("real head, a partial field of view: its back 36 mm (occipital pole and skull)", "refuse",
         sitk.RegionOfInterest(head, [128, 128, 12], [0, 0, 0])),
        ("real head, a partial field of view: three 3 mm coronal slices", "refuse",
         sitk.RegionOfInterest(head, [128, 128, 3], [0, 0, 28])),
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


def central_slab(image: sitk.Image, thickness_mm: float) -> sitk.Image:
    """The middle ``thickness_mm`` of the image along its voxel axis 2 (axial on BraTS' grid)."""
    size = list(image.GetSize())
    count = min(size[2], max(1, int(round(thickness_mm / image.GetSpacing()[2]))))
    start = (size[2] - count) // 2
    return sitk.RegionOfInterest(image, size[:2] + [count], [0, 0, start])


def brats_cases(folder: Path, modality: str) -> list[tuple[str, str, sitk.Image]]:
    """Real skull-stripped scans with tumours (should pass: as they are, in 5 mm slices, and their central
    60 mm axial slab), and the same scans as failures: another contrast, or stored upside down / back
    to front (should be refused)."""
    read = lambda path: sitk.ReadImage(str(path), sitk.sitkFloat32)  # noqa: E731
    names = sorted(path.name[:-len(LESION_SUFFIX)] for path in folder.glob(f"*{LESION_SUFFIX}"))
    own = modality.lower()
    others = tuple(contrast for contrast in ("t1", "t2", "flair") if contrast != own)
    thick = ACQUISITIONS["thick-5mm"]
    found = [(f"BraTS {case} {own.upper()}", "pass", read(folder / f"{case}_{own}.nii.gz")) for case in names]
    found += [(f"BraTS {case} {own.upper()}, 5 mm slices", "pass", thick(read(folder / f"{case}_{own}.nii.gz")))
              for case in names]
    found += [(f"BraTS {case} {own.upper()}, a partial field of view: the central 60 mm axial slab", "pass",
               central_slab(read(folder / f"{case}_{own}.nii.gz"), 60.0)) for case in names]
    for case in names[:2]:
        for slices, acquire in (("", lambda image: image), (", 5 mm slices", thick)):
            image = acquire(read(folder / f"{case}_{own}.nii.gz"))
            found += [(f"BraTS {case} {own.upper()}{slices} stored upside down", "refuse", flipped(image, 0)),
                      (f"BraTS {case} {own.upper()}{slices} stored back to front", "refuse", flipped(image, 1))]
            found += [(f"BraTS {case} {other.upper()}{slices} (other contrast)", "refuse",
                       acquire(read(folder / f"{case}_{other}.nii.gz"))) for other in others]
    return found


def other_contrast_cases(*templates) -> list[tuple[str, str, sitk.Image]]:
    """For a T2 or FLAIR template: inputs that are not brain MRI of its contrast."""
    read = lambda path: sitk.ReadImage(str(path), sitk.sitkFloat32)  # noqa: E731
    return ([("real T1 head (ITK KmeansTest)", "refuse", read(REPO / "Testing" / "Data" / "itk_kmeans_t1.nii.gz"))]
            + [(f"{template.name} template (other contrast)", "refuse", template.image) for template in templates]
            + [("chest-CT-like phantom", "refuse", chest_phantom()), ("uniform noise", "refuse", _noise())])


def measure(template, modality: str, inputs: list[tuple[str, str, sitk.Image]]) -> list[dict]:
    """Each input as a run first meets it: its figures, or why it was refused before the check."""
    measured = []
    for name, expected, image in inputs:
        try:  # what a run does first: the input checks, registration, model space
            validate_volume(image)
            brain_mask, mask_name, stripped = input_brain_mask(image, RunOptions())
            registration = register_scan(image, template, stripped)
            prepared = prepare_model_input(image, template, registration, NORMALISATION, brain_mask, False, mask_name,
                                           modality)
            figures = {"alignment": prepared.alignment, "tissue_order": prepared.tissue_order,
                       "brain_overlap": prepared.brain_overlap, "skull_stripped": stripped}
        except NormativeAnomalyError as error:  # refused before the alignment check
            figures = {"refused_before": str(error)}
        measured.append({"modality": modality, "input": name, "should": expected, **figures})
        print(row(measured[-1]), flush=True)
    return measured


def passes(measured: dict) -> bool:
    """Whether the shipped cut-offs let this input through."""
    if "refused_before" in measured:
        return False
    try:
        check_alignment(measured["alignment"], measured["modality"], measured["tissue_order"],
                        measured["brain_overlap"])
        return True
    except RegistrationError:
        return False


def right(measured: dict) -> bool:
    return passes(measured) == (measured["should"] == "pass")


def row(measured: dict) -> str:
    nan = float("nan")
    alignment, order, overlap = (measured.get(key, nan) for key in ("alignment", "tissue_order", "brain_overlap"))
    if "refused_before" in measured:
        note = f"(refused before the check: {measured['refused_before']})"
    else:
        note = "(skull-stripped) " if measured["skull_stripped"] else ""
    return (f"| {measured['modality']} | {measured['input']} | {measured['should']} | {alignment:+.3f} | {order:+.3f} | "
            f"{overlap:.3f} | {'passes' if passes(measured) else 'refused'} | {'ok' if right(measured) else 'WRONG'} "
            f"{note}|")


def markdown(measured: list[dict]) -> str:
    table = ["| template | input | should | correlation | tissue order | brain overlap | at its cut-offs | |",
             "|---|---|---|---|---|---|---|---|"] + [row(m) for m in measured]
    cutoffs = ", ".join(f"{m} {alignment_cutoff(m)}" for m in ("T1", "T2", "FLAIR"))
    return ("# Alignment check: measured correlations\n\nMade by `scripts/alignment_cutoff.py`. Correlation of the "
            "registered input with the model's template (ICBM 2009c T1 or T2, or the FLAIR-like template synthesised from them) over its brain; cut-offs per contrast: "
            f"{cutoffs}; and the order of the template's tissues in the input (`model_space.tissue_order`, its bands "
            f"eroded by {', '.join(f'{m} {v} voxel(s)' for m, v in TISSUE_BAND_EROSION.items())}, others not; minima "
            f"{', '.join(f'{m} {v}' for m, v in TISSUE_ORDER_MINIMA.items())}); for a skull-stripped input, the "
            f"Dice of its own brain, registered, with the template's (at least {MIN_BRAIN_OVERLAP}). BraTS rows: real pre-operative gliomas from the BraTS 2018 development cases (Menze et al. "
            "2015; Bakas et al. 2017, 2018), skull-stripped; \"5 mm slices\": re-acquired as 5 mm axial slices, "
            "each the mean of five 1 mm ones (`evaluation.ACQUISITIONS`), where a skull-stripped scan's brain is "
            "compared with the template's brain as such slices hold it (`model_space.brain_as_sliced`). \"A partial "
            "field of view\": narrower than "
            f"{PARTIAL_FIELD_OF_VIEW:.0%} of the template's brain along an axis, registered within its own field of "
            "view (the template onto the input) and judged on the part of the brain it holds.\n\n"
            + "\n".join(table) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here, and its figures as .json beside it")
    parser.add_argument("--render", action="store_true",
                        help="no registration: re-apply the shipped cut-offs to the figures in --out's .json")
    parser.add_argument("--contrasts", nargs="+", choices=("T1", "T2", "FLAIR"), default=["T1", "T2", "FLAIR"],
                        help="measure only these templates' rows; the others are kept from --out's .json")
    parser.add_argument("--brats", type=Path, default=REPO.parent / "shared" / "data" / "brats-dev",
                        help="BraTS cases (FLAIR, T1, T2, seg) for real scans with tumours, where present")
    args = parser.parse_args()
    t1, t2 = load_template("icbm152_2009c_t1_2mm"), load_template("icbm152_2009c_t2_2mm")
    flair = load_template("icbm152_2009c_flair_2mm")
    figures = args.out.with_suffix(".json") if args.out else None
    if args.render:  # the cut-offs re-applied to the figures measured before
        if figures is None or not figures.is_file():
            parser.error("--render needs --out, with the .json beside it that a measuring run wrote")
        measured = json.loads(figures.read_text())
    else:
        t1, t2 = load_template("icbm152_2009c_t1_2mm"), load_template("icbm152_2009c_t2_2mm")
        flair = load_template("icbm152_2009c_flair_2mm")
        brats = args.brats.is_dir()
        kept = json.loads(figures.read_text()) if figures and figures.is_file() else []
        measured = []
        for template, modality, inputs in [
                (t1, "T1", lambda: cases(t1) + (brats_cases(args.brats, "T1") if brats else [])),
                (t2, "T2", lambda: (brats_cases(args.brats, "T2") if brats else []) + other_contrast_cases(t1)),
                (flair, "FLAIR",
                 lambda: (brats_cases(args.brats, "FLAIR") if brats else []) + other_contrast_cases(t1, t2))]:
            if modality in args.contrasts:
                measured += measure(template, modality, inputs())
            else:
                measured += [row for row in kept if row["modality"] == modality]
        if figures:
            figures.write_text(json.dumps(measured, indent=1) + "\n")
    if args.out:
        args.out.write_text(markdown(measured))
    wrong = sum(not right(m) for m in measured)
    print(f"{len(measured) - wrong} of {len(measured)} inputs on the right side of their cut-off (or refused before it)")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
