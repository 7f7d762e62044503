#!/usr/bin/env python3
"""Real lesions: every model of each contrast on the BraTS development cases, beside intensity alone.

    python scripts/evaluate_brats.py [--data ../shared/data/brats-dev] [--out docs/evaluation]
                                     [--contrasts t1 t2 flair] [--models NAME ...] [--cases N]
                                     [--folds FOLDER ...] [--acquisition KIND] [--reuse] [--keep-figure]

For each contrast (the models whose card names that modality, or ``--models``) every case goes
through the full pipeline exactly as ``normative-anomaly run`` (registration, the model, scoring,
mapping back onto the input's grid); a case under the alignment cut-off is still scored and
counted as a refusal. Per model, as the mean over cases (as the data set's anchors are):

- AUPRC and best Dice (the threshold chosen with the expert label: optimistic) of the anomaly
  map; Dice at the model's calibrated threshold (what a user gets by default);
- mL flagged outside the tumour at the calibrated threshold;
- refusals (alignment under the cut-off) and seconds per volume (registration included).

The target is the whole tumour (label > 0), scored within the brain (voxels > 0: the cases are
skull-stripped, and those out-of-brain zeros would inflate every score). "Intensity alone" is the
contrast normalised between its 1st and 99th brain percentiles, bright for FLAIR and T2, dark for
T1: the row to beat. A model never scores a case it learnt from: a network trained on some of
these cases (its card's ``training.cases``) scores each case with a package of the same model that
did not see it (``--folds``: the other folds' packages), and location statistics fitted on them
are refitted without the case scored. Writes brats.md, brats.json and brats.png into ``--out``.

Data: BraTS 2018 (Menze et al. 2015, Bakas et al. 2017 and 2018); see the data folder's README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.evaluation import ACQUISITIONS, auprc, best_dice, dice, lesion_cases, package_for
from NormativeAnomalyLib.models import available_models, resolve_model
from NormativeAnomalyLib.errors import ModelPackageError, RegistrationError
from NormativeAnomalyLib.model_space import alignment_cutoff, check_alignment
from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
from NormativeAnomalyLib.training.scans import LESION_SUFFIX
from NormativeAnomalyLib.training.normative import fold_networks, leave_out, scan_sums
from NormativeAnomalyLib.volume_io import read_volume

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats-dev"
CONTRASTS = {"t1": "T1", "t2": "T2", "flair": "FLAIR"}  # file suffix -> card modality
BRIGHT = {"t1": False, "t2": True, "flair": True}  # which way lesions go, for intensity alone
CITATION = ("BraTS 2018: Menze et al., IEEE TMI 2015 (doi:10.1109/TMI.2014.2377694); Bakas et al., "
            "Scientific Data 2017 (doi:10.1038/sdata.2017.117); Bakas et al., arXiv:1811.02629 (2018). "
            "TCIA cases from TCGA-GBM / TCGA-LGG (The Cancer Imaging Archive).")
# Published figures on BraTS: other splits and training sets, so a guide only.
PUBLISHED = [
    ("FLAIR", "thresholding the intensity (Meissen et al. 2021, arXiv:2109.00482)", "", "0.74", ""),
    ("T2", "conditioned diffusion (Behrendt et al., trained on healthy IXI scans)", "0.59", "", "0.53"),
    ("T2", "patched diffusion, pDDPM (Behrendt et al., trained on healthy IXI scans)", "0.55", "", "0.50"),
]


@dataclass
class CaseScore:
    case: str
    auprc: float
    best_dice: float
    dice_calibrated: float = float("nan")
    outside_ml: float = float("nan")
    alignment: float = float("nan")
    refused: bool = False
    seconds: float = 0.0


@dataclass
class ModelScore:
    model: str
    contrast: str
    cases: list[CaseScore] = field(default_factory=list)
    training: str = "–"  # training time and device
    reused: bool = False  # kept from an earlier run (--reuse), not measured by this one

    def mean(self, name: str) -> float:
        values = [getattr(case, name) for case in self.cases]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")


def load_case(folder: Path, case: str, contrast: str) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(image, whole tumour, brain) with the arrays in (z, y, x)."""
    image = read_volume(folder / f"{case}_{contrast}.nii.gz")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}{LESION_SUFFIX}"))) > 0
    brain = (sitk.GetArrayViewFromImage(image) > 0) | truth
    return image, truth, brain


def acquired_case(folder: Path, case: str, contrast: str, acquisition: str) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """``load_case`` after ``ACQUISITIONS[acquisition]``: the label follows onto the new grid (nearest)."""
    image, truth, brain = load_case(folder, case, contrast)
    if ACQUISITIONS[acquisition] is None:
        return image, truth, brain
    acquired = ACQUISITIONS[acquisition](image)
    label = sitk.ReadImage(str(folder / f"{case}{LESION_SUFFIX}"), sitk.sitkUInt8)
    truth = sitk.GetArrayFromImage(sitk.Resample(label, acquired, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    return acquired, truth, (sitk.GetArrayViewFromImage(acquired) > 0) | truth


def intensity_alone(image: sitk.Image, brain: np.ndarray, bright: bool) -> np.ndarray:
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(values[brain], [1, 99])
    scaled = (values - low) / max(high - low, 1e-6)
    return scaled if bright else -scaled


def score_case(case: str, scores: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> CaseScore:
    return CaseScore(case, auprc(scores[brain], truth[brain]), best_dice(scores[brain], truth[brain])[0])


def refused(run) -> bool:
    """Whether a run (made with accept_poor_alignment) would have been refused by the alignment check."""
    try:
        check_alignment(run.alignment, run.model.card["modality"], run.tissue_order, run.brain_overlap)
    except RegistrationError:
        return True
    return False


def seen_cases(package) -> list[str]:
    """The cases a package's location statistics were fitted on (its card lists them)."""
    return list(package.card["scoring"].get("normative", {}).get("cases", []))


def training_cost(package) -> str:
    """Training time and device from the card ('–' for a package with no network)."""
    training = package.card.get("training", {})
    if "seconds" not in training:
        return "–"
    return f"{training['seconds'] / 60:.0f} min, {training.get('device', 'CPU')}"


REGISTRATIONS: dict[tuple, dict] = {}  # (contrast, template, registration kind, skull option) -> case -> Registration


def location_sums(package, networks: list, folder: Path, contrast: str, registrations: dict,
                  skull_stripped: bool | None) -> list:
    """Healthy residual sums of every case the package's location statistics were fitted on, each
    from a network that did not learn from that case."""
    settings = package.card["scoring"]["normative"]
    sums = []
    for case in seen_cases(package):
        if not (folder / f"{case}_{contrast}.nii.gz").is_file():
            raise SystemExit(f"{package.name} was fitted on {case}, which is not in {folder}: cannot leave it out")
        image, _, _ = load_case(folder, case, contrast)
        label = sitk.ReadImage(str(folder / f"{case}{LESION_SUFFIX}"), sitk.sitkUInt8)
        scan, registrations[case] = scan_sums(package_for(case, networks), image, label, case,
                                              settings["smoothing_mm"], settings["lesion_margin_mm"],
                                              registrations.get(case), skull_stripped=skull_stripped)
        sums.append(scan)
    return sums


def evaluate_model(model: str, contrast: str, folder: Path, cases: list[str], keep: dict,
                   skull_stripped: bool | None = None, folds: list[str] = (),
                   acquisition: str = "as-is") -> list[ModelScore]:
    """The model's scores; for a model with location statistics, also its plain residual's (same
    registration and network, no statistics: AUPRC and best Dice only, as its calibration is the
    statistics'). Each case is scored by a network that did not learn from it (the package or one
    of its ``folds``), with statistics fitted without it on residuals of networks that did not
    learn from theirs."""
    package = resolve_model(model)
    networks = fold_networks(package, [fold for fold in map(resolve_model, folds) if fold.name == package.name])
    # A variant of a package (its folder renamed, e.g. other scoring settings) is labelled by its folder.
    label = package.name if package.path.name == package.name else package.path.name
    result = ModelScore(label, contrast, training=training_cost(package))
    ablation = ModelScore(f"{label} without location statistics", contrast)
    plain = {case: package_for(case, networks) for case in cases}
    if any(network is not networks[0] for network in plain.values()):
        print(f"  {package.name}: each case scored by a fold that did not learn from it", flush=True)
    seen = [case for case in seen_cases(package) if case in cases]
    # Models of a contrast mostly share a template: each case is registered to it once.
    registrations = REGISTRATIONS.setdefault((contrast, package.template.name,
                                              package.card["preprocessing"]["registration"], skull_stripped), {})
    sums = location_sums(package, networks, folder, contrast, registrations, skull_stripped) if seen else []
    if seen:
        print(f"  {package.name}: statistics fitted on {len(seen)} of these cases, refitted without each", flush=True)
    for case in cases:
        image, truth, brain = acquired_case(folder, case, contrast, acquisition)
        start = time.perf_counter()
        if case in seen:
            scored_by = leave_out(plain[case], sums, {case})
        else:
            scored_by = dataclasses.replace(plain[case], normative=package.normative)
        reuse = registrations.get(case) if acquisition == "as-is" else None  # another grid: registered anew
        run = detect_anomalies(image, scored_by, RunOptions(device="cpu", accept_poor_alignment=True,
                                                            registration=reuse,
                                                            skull_stripped=skull_stripped))
        seconds = time.perf_counter() - start + (reuse.seconds if reuse is not None else 0.0)
        if acquisition == "as-is":
            registrations[case] = run.registration
        scores = sitk.GetArrayFromImage(run.anomaly_map)
        predicted = run.segmentation.mask
        score = score_case(case, scores, truth, brain)
        score.dice_calibrated = dice(predicted, truth)
        score.outside_ml = float((predicted & ~truth).sum() * np.prod(image.GetSpacing()) / 1000)
        score.alignment, score.refused, score.seconds = run.alignment, refused(run), seconds
        result.cases.append(score)
        if case == keep.get(contrast):
            keep[(contrast, label)] = (run.pseudo_healthy, run.anomaly_map, predicted,
                                              run.segmentation.threshold)
        print(f"  {label} {case}: AUPRC {score.auprc:.3f}, best Dice {score.best_dice:.3f}, Dice "
              f"{score.dice_calibrated:.3f}, {score.outside_ml:.1f} mL outside, alignment {score.alignment:.2f}, "
              f"{seconds:.1f} s", flush=True)
        if package.normative is not None:
            plain_run = detect_anomalies(image, plain[case], RunOptions(device="cpu", accept_poor_alignment=True,
                                                                  registration=run.registration,
                                                                  skull_stripped=skull_stripped))
            ablation.cases.append(score_case(case, sitk.GetArrayFromImage(plain_run.anomaly_map), truth, brain))
    return [result] + ([ablation] if ablation.cases else [])


def evaluate_intensity(contrast: str, folder: Path, cases: list[str], acquisition: str = "as-is") -> ModelScore:
    result = ModelScore("intensity alone", contrast)
    for case in cases:
        image, truth, brain = acquired_case(folder, case, contrast, acquisition)
        result.cases.append(score_case(case, intensity_alone(image, brain, BRIGHT[contrast]), truth, brain))
    return result


def models_for(contrast: str, requested: list[str] | None) -> list[str]:
    if requested:
        return [name for name in requested if resolve_model(name).card["modality"] == CONTRASTS[contrast]]
    return [entry["name"] for entry in available_models()
            if resolve_model(entry["name"]).card["modality"] == CONTRASTS[contrast]]


def markdown(results: list[ModelScore], cases: list[str], acquisition: str = "as-is") -> str:
    def cell(value: float, digits: int = 3) -> str:
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"

    title = "# Real lesions: BraTS development cases"
    if acquisition != "as-is":
        title += (f", re-acquired ({acquisition}: every case as `evaluation.ACQUISITIONS` makes it before it "
                  "is scored; the location statistics come from the scans as they are)")
    lines = [title, "",
             f"Generated by `scripts/evaluate_brats.py` on the {len(cases)} development cases of "
             "`../shared/data/brats-dev` (real pre-operative gliomas, skull-stripped, 1 mm). Whole tumour "
             "(label > 0) within the brain; mean over cases. Dice at the calibrated threshold is what a user "
             "gets by default; best Dice chooses the threshold with the expert label (optimistic). "
             "Refused: alignment under the cut-off "
             f"of the model's contrast ({', '.join(f'{m} {alignment_cutoff(m)}' for m in ('T1', 'T2', 'FLAIR'))}) "
             "or tissue order or brain overlap under its minimum (docs/alignment.md); "
             "such cases are still scored here. The scans are recognised as skull-stripped, registered to the "
             "template's brain and scored on their own brain, as a run does. A network that learnt healthy tissue "
             "from some of these cases (its card's training.cases; tumour and a 10 mm margin left out of its loss) "
             "scores only the cases it did not see: each case is scored by the fold trained without it "
             "(leave-cases-out). A model with location statistics (location-aware scoring: the residual as a deviation from "
             "healthy tissue at the same template location) fitted on them, as its card says, is scored on each "
             "case by a copy fitted without that case (leave-one-case-out: statistics and calibration from the "
             "other nine cases' tissue over 10 mm from their tumours); its row \"without location statistics\" "
             "is the same run's plain residual (threshold-free figures only). A row named after a folder other "
             "than its model (e.g. dae-flair-input1) is the same network with other scoring settings, fitted and "
             "scored the same way: a switch measured. Training: the time and device in the model's card.",
             "", "| contrast | model | AUPRC | best Dice | Dice @ calibrated | mL outside tumour | refused | "
             "s / volume | training |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        refused = sum(c.refused for c in result.cases) if np.isfinite(result.mean("dice_calibrated")) else None
        lines.append(f"| {CONTRASTS[result.contrast]} | {result.model}{' †' if result.reused else ''} | "
                     f"{cell(result.mean('auprc'))} | "
                     f"{cell(result.mean('best_dice'))} | {cell(result.mean('dice_calibrated'))} | "
                     f"{cell(result.mean('outside_ml'), 1)} | "
                     f"{'–' if refused is None else f'{refused}/{len(result.cases)}'} | "
                     f"{cell(result.mean('seconds'), 1) if refused is not None else '–'} | {result.training} |")
    if any(result.reused for result in results):
        lines += ["", "† measured by an earlier run of this script (`--reuse`: the model and the pipeline have not "
                  "changed since) and kept; the other rows were measured by this run."]
    if acquisition == "as-is":
        lines += ["", "Tricks measured apart from this table (template space, threshold-free, the same cases): the "
                  "diffusion model's sampling (samples or noise levels averaged, spread scoring, THOR harmonisation, "
                  "patch-wise noising) in [diffusion-tricks.md](diffusion-tricks.md), a deformable registration "
                  "refinement in [deformable.md](deformable.md)."]
    lines += ["", "Published on BraTS (other splits and training sets, so a guide only):", "",
              "| contrast | method | AUPRC | best Dice | Dice |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {m} | {a or '–'} | {b or '–'} | {d or '–'} |" for c, m, a, b, d in PUBLISHED]
    lines += ["", "![A case per contrast: input with the expert outline (green), pseudo-healthy, anomaly map, "
              "segmentation at the calibrated threshold (yellow) against the expert outline](brats.png)", "",
              f"Data: {CITATION}", ""]
    return "\n".join(lines)


def figure(folder: Path, keep: dict, results: list[ModelScore], path: Path, acquisition: str = "as-is") -> None:
    """One row per (contrast, model) kept: input + expert outline, pseudo-healthy, anomaly map,
    segmentation vs expert, on the slice with the most tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r.contrast, r.model) for r in results if (r.contrast, r.model) in keep]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for row, (contrast, model) in enumerate(rows):
        case = keep[contrast]
        image, truth, _ = acquired_case(folder, case, contrast, acquisition)
        values = sitk.GetArrayFromImage(image)
        healthy, scores, predicted, threshold = keep[(contrast, model)]
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        low, high = np.percentile(values[values > 0], [1, 99.5])
        panels = [values, sitk.GetArrayFromImage(healthy), sitk.GetArrayFromImage(scores), values]
        for column, panel in enumerate(panels):
            ax = axes[row, column]
            flip = np.flipud(panel[k])
            if column == 2:
                ax.imshow(flip, cmap="inferno", vmin=0, vmax=2 * threshold)
            else:
                ax.imshow(flip, cmap="gray", vmin=low, vmax=high)
            if column in (0, 3):
                ax.contour(np.flipud(truth[k]), [0.5], colors="lime", linewidths=0.7)
            if column == 3:
                ax.contour(np.flipud(predicted[k]), [0.5], colors="yellow", linewidths=0.7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(f"{CONTRASTS[contrast]}: {model}\n{case}", fontsize=7)
    for column, title in enumerate(["input + expert", "pseudo-healthy", "anomaly map", "segmentation vs expert"]):
        axes[0, column].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def earlier_training(model: str) -> str:
    """The training column of a row written before the table had one: from the model's card."""
    try:
        return training_cost(resolve_model(model))
    except ModelPackageError:  # an ablation row, or a model no longer installed
        return "–"


def with_earlier_rows(results: list[ModelScore], earlier: list[dict]) -> list[ModelScore]:
    """``results`` and the earlier rows of models not in them, in contrast order (each contrast's
    rows evaluated now first, then the earlier ones in their order)."""
    rows = {(r.contrast, r.model): r for r in results}
    for row in earlier:
        if (row["contrast"], row["model"]) not in rows:
            cases = [CaseScore(**case) for case in row["cases"]]
            rows[(row["contrast"], row["model"])] = ModelScore(row["model"], row["contrast"], cases,
                                                               row.get("training") or earlier_training(row["model"]),
                                                               reused=True)
    position = {(row["contrast"], row["model"]): index for index, row in enumerate(earlier)}
    now = [(r.contrast, r.model) for r in results]
    return sorted(rows.values(), key=lambda r: (list(CONTRASTS).index(r.contrast), (r.contrast, r.model) not in now,
                                                now.index((r.contrast, r.model)) if (r.contrast, r.model) in now
                                                else position[(r.contrast, r.model)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "evaluation")
    parser.add_argument("--contrasts", nargs="+", default=list(CONTRASTS), choices=list(CONTRASTS))
    parser.add_argument("--models", nargs="+", help="model names (default: every bundled model of each contrast)")
    parser.add_argument("--cases", type=int, help="only the first N cases (a quick look; not for the table)")
    parser.add_argument("--figure-case", help="the case shown in the figure (default: the first)")
    parser.add_argument("--folds", nargs="+", default=[],
                        help="package folders of the models' other folds (same name, trained on other cases)")
    parser.add_argument("--acquisition", choices=list(ACQUISITIONS), default="as-is",
                        help="re-acquire each case before scoring it: thick slices or another storage orientation")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the rows of --out/brats.json for models not evaluated in this run (models and "
                             "pipeline unchanged since); the figure shows the rows evaluated now")
    parser.add_argument("--keep-figure", action="store_true",
                        help="leave --out/brats.png as it is (e.g. when adding one model's rows with --reuse)")
    parser.add_argument("--skull", choices=["detect", "stripped", "template"], default="detect",
                        help="brain scored: detected as a run does (default), the scan's own, or the template's")
    args = parser.parse_args(argv)
    cases = lesion_cases(args.data, args.cases)
    if not cases:
        raise SystemExit(f"no BraTS cases (*{LESION_SUFFIX}) in {args.data}")
    keep: dict = {contrast: args.figure_case or cases[0] for contrast in args.contrasts}
    results = []
    for contrast in args.contrasts:
        results.append(evaluate_intensity(contrast, args.data, cases, args.acquisition))
        for model in models_for(contrast, args.models):
            print(f"{CONTRASTS[contrast]} {model}: {len(cases)} cases", flush=True)
            results += evaluate_model(model, contrast, args.data, cases, keep,
                                      {"detect": None, "stripped": True, "template": False}[args.skull], args.folds,
                                      args.acquisition)
    if args.reuse and (args.out / "brats.json").is_file():
        results = with_earlier_rows(results, json.loads((args.out / "brats.json").read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "brats.md").write_text(markdown(results, cases, args.acquisition))
    (args.out / "brats.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if not args.keep_figure:
        figure(args.data, keep, results, args.out / "brats.png", args.acquisition)
    print(markdown(results, cases, args.acquisition))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
