#!/usr/bin/env python3
"""Does a B-spline warp after the affine help? Both of its effects, measured in template space.

    python scripts/deformable_refinement.py [--data ../shared/data/brats-dev] [--out docs/evaluation]
                                            [--contrasts t2 t1] [--spacings 50 20] [--cases N] [--render]

Each BraTS development case is registered to its model's template as the pipeline does (affine,
to the template's brain: the scans are skull-stripped), then refined by a cubic B-spline
(``registration.refine_deformable``) at each control spacing. Under every transform the case goes
into model space with its own brain mask, through the network, and the plain anomaly map (no
location statistics: those were fitted under the affine) is scored against the expert label
warped by the same transform (nearest neighbour), inside the model-space brain. Per transform,
mean over cases:

- AUPRC and best Dice (whole tumour, label > 0);
- alignment (the pipeline's correlation with the template: what the warp gains);
- the tumour's volume in template space over the affine's (below 1: the warp shrinks the lesion);
- the B-spline's mean displacement over the template's brain;
- healthy residual: mean |input - reconstruction| (model units) and the map's residual before its
  scaling, over the scored brain more than 10 mm from the tumour (what the model must explain);
- registration seconds (for a refinement: its own, on top of the affine's).

Template space only: a B-spline has no analytic inverse, so its maps cannot go back onto the
input's grid. Writes deformable.md and deformable.json into ``--out`` (figures only, no voxels).

Data: BraTS 2018 (Menze et al. 2015, Bakas et al. 2017 and 2018); see the data folder's README.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from NormativeAnomalyLib.evaluation import auprc, best_dice, lesion_cases
from NormativeAnomalyLib.inference import run_on_model_input
from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.progress import Monitor
from NormativeAnomalyLib.registration import Registration, refine_deformable, register_to_template
from NormativeAnomalyLib.scoring import anomaly_map, residual, residual_map, scoring_mask
from NormativeAnomalyLib.training.scans import LESION_SUFFIX, prepare_scan
from NormativeAnomalyLib.volume_io import read_volume

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats-dev"
MODELS = {"t2": "dae-t2", "t1": "dae-t1", "flair": "dae-flair"}
CITATION = ("BraTS 2018: Menze et al., IEEE TMI 2015; Bakas et al., Scientific Data 2017; "
            "Bakas et al., arXiv:1811.02629 (2018)")
HEALTHY_MARGIN_MM = 10.0
MEASURES = ["auprc", "best_dice", "alignment", "tumour_volume_ratio", "warp_mm", "healthy_abs_residual",
            "healthy_residual", "healthy_map_mean", "registration_seconds"]


def measure(package, image: sitk.Image, label: sitk.Image, registration: Registration) -> dict:
    """One transform's figures for one case (template space)."""
    card, template = package.card, package.template
    model_input, truth, _ = prepare_scan(image, template, card["preprocessing"], label, True, registration)
    inference = run_on_model_input(package, model_input, torch.device("cpu"), Monitor(), None, None, "fp32")
    spacing_zyx = tuple(reversed(template.image.GetSpacing()))
    scores = anomaly_map(model_input.image, inference.reconstruction, model_input.brain_mask, spacing_zyx,
                         card["scoring"], None)
    inside = model_input.brain_mask
    # Healthy: the scored (eroded) brain, over 10 mm from the warped tumour.
    far = ndimage.distance_transform_edt(~truth, sampling=spacing_zyx) > HEALTHY_MARGIN_MM
    healthy = scoring_mask(inside, spacing_zyx, card["scoring"]["mask_erosion_mm"]) & far
    error = residual(model_input.image, inference.reconstruction, "absolute")
    signed = residual_map(model_input.image, inference.reconstruction, card["scoring"])  # the map before its scaling
    return {"auprc": auprc(scores[inside], truth[inside]), "best_dice": best_dice(scores[inside], truth[inside])[0],
            "alignment": model_input.alignment, "tumour_ml": float(truth.sum() * np.prod(spacing_zyx) / 1000),
            "healthy_abs_residual": float(error[healthy].mean()), "healthy_residual": float(signed[healthy].mean()),
            "healthy_map_mean": float(scores[healthy].mean()), "warp_mm": warp_mm(registration, template),
            "registration_seconds": registration.seconds, "metric": registration.metric}


def warp_mm(registration: Registration, template) -> float:
    """Mean displacement of the B-spline part over the template's brain (0 for the affine)."""
    if registration.kind != "affine+bspline":
        return 0.0
    image = template.image
    field = sitk.TransformToDisplacementField(sitk.CompositeTransform(registration.transform).GetNthTransform(1),
                                              sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(),
                                              image.GetSpacing(), image.GetDirection())
    brain = sitk.GetArrayViewFromImage(template.brain_mask) > 0
    return float(np.linalg.norm(sitk.GetArrayViewFromImage(field), axis=-1)[brain].mean())


def evaluate_contrast(contrast: str, folder: Path, cases: list[str], spacings: list[float]) -> dict:
    package = resolve_model(MODELS[contrast])
    target = package.template.registration_target(True)
    rows: dict[str, list[dict]] = {"affine": [], **{f"B-spline {s:g} mm": [] for s in spacings}}
    for case in cases:
        image = read_volume(folder / f"{case}_{contrast}.nii.gz")
        label = sitk.ReadImage(str(folder / f"{case}{LESION_SUFFIX}"), sitk.sitkUInt8)
        affine = register_to_template(image, target, package.card["preprocessing"]["registration"])
        transforms = {"affine": affine}
        for spacing in spacings:
            transforms[f"B-spline {spacing:g} mm"] = refine_deformable(image, target, affine, spacing)
        baseline = None
        for name, registration in transforms.items():
            start = time.perf_counter()
            figures = {"case": case, **measure(package, image, label, registration)}
            baseline = baseline or figures["tumour_ml"]
            figures["tumour_volume_ratio"] = figures["tumour_ml"] / baseline
            rows[name].append(figures)
            print(f"  {contrast} {case} {name}: AUPRC {figures['auprc']:.3f}, best Dice {figures['best_dice']:.3f}, "
                  f"alignment {figures['alignment']:.3f}, tumour x{figures['tumour_volume_ratio']:.3f}, warp "
                  f"{figures['warp_mm']:.1f} mm, healthy |residual| {figures['healthy_abs_residual']:.4f}, residual "
                  f"{figures['healthy_residual']:.4f}, map {figures['healthy_map_mean']:.3f}, "
                  f"registration {registration.seconds:.1f} s (scoring {time.perf_counter() - start:.1f} s)",
                  flush=True)
    means = {name: {key: float(np.nanmean([row[key] for row in values])) for key in MEASURES}
             for name, values in rows.items()}
    return {"model": package.name, "template": package.template.name, "cases": cases, "means": means,
            "per_case": rows}


def table(results: dict) -> str:
    lines = ["| Contrast (model) | Transform | AUPRC | Best Dice | Alignment | Tumour volume vs affine | "
             "Warp mm | Healthy \\|residual\\| | Healthy residual | Registration s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for contrast, result in results.items():
        for name, m in result["means"].items():
            lines.append(f"| {contrast.upper()} ({result['model']}) | {name} | {m['auprc']:.3f} | "
                         f"{m['best_dice']:.3f} | {m['alignment']:.3f} | {m['tumour_volume_ratio']:.3f} | "
                         f"{m['warp_mm']:.1f} | {m['healthy_abs_residual']:.4f} | {m['healthy_residual']:.4f} | "
                         f"{m['registration_seconds']:.1f} |")
    return "\n".join(lines)


def markdown(results: dict, spacings: list[float]) -> str:
    counts = ", ".join(f"{c.upper()} {len(r['cases'])}" for c, r in results.items())
    return f"""# Deformable refinement after the affine: what it gains, what it erases

Generated by `scripts/deformable_refinement.py`; do not edit by hand.

Each BraTS development case (cases: {counts}) is registered to its model's template as the pipeline
does (affine, to the template's brain), then refined by a cubic B-spline with control points
{" and ".join(f"{s:g}" for s in spacings)} mm apart (`registration.refine_deformable`: Mattes MI, LBFGSB,
shrink 4 and 2, fixed seed, one thread). Under each transform the case goes into model space with its
own brain mask and through the network; the plain anomaly map (no location statistics: they were
fitted under the affine) is scored against the expert label (whole tumour) warped by the same
transform, inside the model-space brain. Means over cases:

- **AUPRC, best Dice**: the map against the warped label (best Dice chooses its threshold with the label).
- **Alignment**: the pipeline's correlation of the registered scan with the template.
- **Tumour volume vs affine**: the warped tumour's volume in template space over the affine's;
  below 1, the warp shrinks the lesion towards healthy anatomy.
- **Warp mm**: the B-spline's mean displacement over the template's brain.
- **Healthy |residual|**: mean |input - reconstruction| (model units) over the scored brain more
  than {HEALTHY_MARGIN_MM:g} mm from the tumour, what the model must explain; **healthy residual**:
  the map's own residual there (signed as the model scores, median-filtered, before its scaling by
  the scan's median residual: that median is 0 on most of these cases for a one-signed residual, and
  clamped at 1e-6, so the scaled map's healthy mean says nothing; it is in the JSON only).
- **Registration s**: per case, 2 CPU cores shared with other work; a refinement's own time, on top
  of the affine's.

Template space only: a B-spline has no analytic inverse, so it is not wired into the pipeline.

{table(results)}

Data: {CITATION}. No voxels of the cases are stored here; per-case figures are in `deformable.json`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "evaluation")
    parser.add_argument("--contrasts", nargs="+", choices=sorted(MODELS), default=["t2"])
    parser.add_argument("--spacings", nargs="+", type=float, default=[50.0, 20.0], help="control spacings (mm)")
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    parser.add_argument("--render", action="store_true", help="only rewrite deformable.md from deformable.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / "deformable.json").read_text())
        (args.out / "deformable.md").write_text(markdown(saved["results"], saved["spacings_mm"]))
        print(table(saved["results"]))
        return
    torch.set_num_threads(1)  # the registration runs on one thread too; leave the other core to other work
    cases = lesion_cases(args.data, args.cases)
    if not cases:
        raise SystemExit(f"no BraTS cases in {args.data}")
    results = {}
    for contrast in args.contrasts:
        results[contrast] = evaluate_contrast(contrast, args.data, cases, args.spacings)
        # Written after each contrast, so a long run keeps what it has measured.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "deformable.json").write_text(json.dumps(
            {"spacings_mm": args.spacings, "citation": CITATION, "results": results}, indent=1) + "\n")
        (args.out / "deformable.md").write_text(markdown(results, args.spacings))
    print(table(results))


if __name__ == "__main__":
    main()
