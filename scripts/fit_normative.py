#!/usr/bin/env python3
"""Location-aware scoring for a model package: fit healthy residual statistics per template voxel.

    python scripts/fit_normative.py --model dae-t2 --data ../shared/data/brats-dev --suffix _t2.nii.gz \
        --out Resources/Models/dae-t2 --overwrite --residual positive --scan-scale --data-note "..."
    python scripts/fit_normative.py --model dae-t1 --data my_controls/ --suffix .nii.gz --out my-dae-t1

Every scan ``<case><suffix>`` in ``--data`` goes through the package's own registration, model
and residual; a label ``<case>_seg.nii.gz`` beside it, where there is one, marks lesions, which
are left out with a margin (scans of patients then lend their healthy tissue). A network that
learnt from some of the scans (its card's training.cases) lends its residuals only for the
others; ``--folds`` (the same model trained on other cases) gives the rest, so the statistics
describe scans the network has not seen. The per-voxel
mean and spread of the healthy residuals go into the package (normative.safetensors), and the
calibration is re-measured on the same healthy voxels, each scan scored with statistics fitted
without it. The card lists the cases: an evaluation on them must leave them out
(``training.normative.leave_out``; scripts/evaluate_brats.py does).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import time
from pathlib import Path


import SimpleITK as sitk

from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.models.package import write_package
from NormativeAnomalyLib.evaluation import package_for
from NormativeAnomalyLib.training.normative import (cross_fitted_calibration, fit_statistics,
                                                    fold_networks, scan_sums)
from NormativeAnomalyLib.training.scans import LESION_MARGIN_MM, LESION_SUFFIX
from NormativeAnomalyLib.templates import load_template
from NormativeAnomalyLib.volume_io import read_volume

LICENCE_NOTE = "Location statistics (normative.safetensors):"


SIGNS = {"absolute": "absolute", "positive": "positive (brighter than expected)",
         "negative": "negative (darker than expected)"}


def describe_scoring(description: str, scoring: dict) -> str:
    """The card's description with one closing sentence on the location-aware scoring (replacing
    an earlier one, and any plain-residual clause)."""
    description = description.split(" Scoring: the ")[0]
    description = re.sub(r"[;,]? the (absolute|positive|negative) residual is the anomaly map", "", description).rstrip()
    scaled = ", divided by the scan's own median deviation" if scoring.get("scan_normalisation") == "median" else ""
    plus = (f" plus the input's own intensity (weight {scoring['input_weight']:g}, scoring.input_weight)"
            if scoring.get("input_weight") else "")
    plus += (f" plus its structural dissimilarity (1 - SSIM, weight {scoring['ssim_weight']:g}, scoring.ssim_weight)"
             if scoring.get("ssim_weight") else "")
    return (f"{description} Scoring: the {SIGNS[scoring['residual']]} residual{plus} as a deviation from healthy "
            f"tissue at the same template location (location-aware scoring, scoring.normative){scaled}.")


def find_scans(folder: Path, suffix: str) -> list[tuple[str, Path, Path | None]]:
    """(case, scan, lesion label or None), sorted by case."""
    scans = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(suffix) and not path.name.endswith(LESION_SUFFIX):
            case = path.name[: -len(suffix)]
            label = folder / f"{case}{LESION_SUFFIX}"
            scans.append((case, path, label if label.is_file() else None))
    return scans


def collect_sums(package, folder: Path, suffix: str, smoothing_mm: float, margin_mm: float,
                 cases: list[str] | None = None, folds: list = ()) -> list:
    """Each scan's healthy residual sums, from the package's network or, where that network learnt
    from the scan, from a fold's that did not."""
    networks = fold_networks(package, list(folds))
    sums = []
    for case, path, label in find_scans(folder, suffix):
        if cases is not None and case not in cases:
            continue
        start = time.perf_counter()
        lesion = sitk.ReadImage(str(label), sitk.sitkUInt8) if label else None
        scan, _ = scan_sums(package_for(case, networks), read_volume(path), lesion, case, smoothing_mm, margin_mm)
        sums.append(scan)
        print(f"  {case}: {int(scan.healthy.sum())} healthy voxels, {time.perf_counter() - start:.1f} s", flush=True)
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the package to start from (name or folder)")
    parser.add_argument("--data", type=Path, required=True, help="folder of scans (and optional lesion labels)")
    parser.add_argument("--suffix", default=".nii.gz", help="scan file names end so (default .nii.gz)")
    parser.add_argument("--out", type=Path, required=True, help="package folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds a package")
    parser.add_argument("--residual", choices=["absolute", "positive", "negative"],
                        help="residual sign (default: the card's); positive where lesions are bright")
    parser.add_argument("--scan-scale", action="store_true", help="divide by the scan's median absolute deviation")
    parser.add_argument("--input-weight", type=float,
                        help="add the input's own signed intensity, so weighted, to a signed residual (FLAIR)")
    parser.add_argument("--ssim-weight", type=float,
                        help="add the structural dissimilarity (1 - SSIM over several scales), so weighted")
    parser.add_argument("--default-fpr", type=float, help="the card's default healthy false-positive rate")
    parser.add_argument("--n4", choices=["on", "off", "with_skull"],
                        help="N4 bias-field correction by default (default: the card's); with_skull: scans with skull only")
    parser.add_argument("--folds", nargs="+", type=Path, default=[],
                        help="folds of the model (its network trained without some scans): each scan's residual "
                             "comes from a network that did not learn from it")
    parser.add_argument("--smoothing-mm", type=float, default=4.0, help="Gaussian sigma of the statistics (mm)")
    parser.add_argument("--margin-mm", type=float, default=LESION_MARGIN_MM, help="distance kept from lesions (mm)")
    parser.add_argument("--data-note", default="", help="what the scans are, for the card")
    parser.add_argument("--name", help="a new package name (default: the starting package's)")
    parser.add_argument("--modality", choices=["T1", "T2", "PD", "FLAIR"],
                        help="a new contrast: the intensity family only (a network knows its contrast)")
    parser.add_argument("--template", help="a new template on the same grid: the intensity family only")
    parser.add_argument("--description", help="a new description for the card")
    parser.add_argument("--license", help="a new licence text for the card (the statistics' note is added)")
    parser.add_argument("--training-data", help="a new training.data text for the card")
    args = parser.parse_args(argv)

    package = resolve_model(args.model)
    if (args.modality or args.template) and package.family != "intensity":
        raise SystemExit("--modality and --template change only an intensity package (a network learnt its contrast)")
    if args.template:
        template = load_template(args.template)
        if list(template.image.GetSize()) != package.card["grid"]["size"]:
            raise SystemExit(f"template {args.template} is not on {package.name}'s grid")
        package = dataclasses.replace(package, card={**package.card, "template": {"name": args.template}},
                                      template=template)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    scoring = {key: value for key, value in package.card["scoring"].items() if key != "normative"}
    if args.residual:
        scoring["residual"] = args.residual
    scoring["scan_normalisation"] = "median" if args.scan_scale else "none"
    if args.input_weight is not None:
        scoring["input_weight"] = args.input_weight
    if args.ssim_weight is not None:
        scoring["ssim_weight"] = args.ssim_weight
    if args.default_fpr is not None:
        scoring["default_fpr"] = args.default_fpr
    card = {**package.card, "scoring": scoring}
    if args.n4:
        card["preprocessing"] = {**card["preprocessing"],
                                 "bias_correction": {"on": True, "off": False}.get(args.n4, args.n4)}
    card.update({key: value for key, value in (("name", args.name), ("modality", args.modality),
                                               ("description", args.description), ("license", args.license)) if value})
    if args.training_data:
        card["training"] = {"data": args.training_data, "script": "scripts/fit_normative.py"}
    plain = dataclasses.replace(package, card=card, normative=None)  # residuals without statistics

    print(f"{package.name}: residuals of {args.data} (*{args.suffix})", flush=True)
    folds = [resolve_model(str(fold)) for fold in args.folds]
    sums = collect_sums(plain, args.data, args.suffix, args.smoothing_mm, args.margin_mm, folds=folds)
    if len(sums) < 2:
        raise SystemExit(f"need at least two scans ending {args.suffix!r} in {args.data}, found {len(sums)}")
    statistics = fit_statistics(sums)
    calibration = cross_fitted_calibration(sums, args.scan_scale)
    cases = [scan.case for scan in sums]
    note = args.data_note or f"{len(cases)} scans from {args.data.name}"
    card["scoring"] = {**scoring, "normative": {
        "data": f"{note}; healthy tissue only: voxels over {args.margin_mm:g} mm from any labelled lesion",
        "smoothing_mm": args.smoothing_mm, "lesion_margin_mm": args.margin_mm, "cases": cases}}
    licence = card["license"].split(LICENCE_NOTE)[0].rstrip().rstrip(".")
    card["description"] = describe_scoring(card["description"], card["scoring"])
    card["license"] = (f"{licence}. {LICENCE_NOTE} smoothed per-voxel aggregates of residuals over {note}; "
                       "no scan's voxels are in the package.")
    card["calibration"] = {"data": f"cross-fitted on the same {len(cases)} scans' healthy voxels (each scan scored "
                                   "with statistics fitted without it)",
                           "fpr": list(calibration.fpr), "threshold": list(calibration.threshold)}
    if args.out.resolve() != package.path.resolve():
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(package.path, args.out)
    written = write_package(args.out, card, None, overwrite=True, normative=statistics)
    fpr = written.card["scoring"]["default_fpr"]
    print(f"{written.name}: wrote {args.out}; threshold {written.calibration.threshold_for_fpr(fpr):.3f} at "
          f"{fpr:g} healthy false-positive rate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
