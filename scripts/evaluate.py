#!/usr/bin/env python3
"""Evaluate models on a folder of cases through the full pipeline, and write a table and a figure.

    python scripts/evaluate.py --data data/testset --models intensity-t1 dae-t1 --out docs/evaluation

A case folder holds ``<case>_image.nii.gz`` with ``<case>_mask.nii.gz`` for lesion cases (no
mask: a healthy scan), and optionally ``cases.csv`` (case, type) to group results by lesion
type; BraTS-style folders (``*_t1.nii.gz`` + ``*_seg.nii.gz``) and ATLAS-style
(``*_T1w.nii.gz`` + ``*_label-L_mask.nii.gz``) pairs are recognised too. Every case goes
through registration, inference, scoring and mapping back exactly as ``normative-anomaly run``.

Per model and lesion type, pooled over the type's cases (voxels inside the brain mask or
the lesion): Dice at the model's calibrated default threshold, best Dice (threshold chosen
with the truth: optimistic, reported separately), AUPRC, AUROC, lesion-wise detection rate;
per healthy scan: volume flagged at the calibrated threshold; seconds per volume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NormativeAnomalyLib.evaluation import Registrations, evaluate_model, find_cases
from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.volume_io import read_volume

def markdown(results: list[dict], cases: list[dict]) -> str:
    kinds = sorted({c["type"] for c in cases if c["mask"] is not None})
    lines = ["| model | lesion type | cases | Dice @ calibrated threshold | best Dice (optimistic) | AUPRC | AUROC | "
             "lesions detected | prevalence |", "|---|---|---|---|---|---|---|---|---|"]
    counts = {k: sum(c["type"] == k for c in cases) for k in kinds}
    for result in results:
        for kind in kinds:
            r = result["types"][kind]
            lines.append(f"| {result['model']} | {kind} | {counts[kind]} | {r['dice_calibrated']:.3f} | "
                         f"{r['best_dice']:.3f} | {r['auprc']:.3f} | {r['auroc']:.3f} | "
                         f"{r['detected']}/{r['lesions']} | {r['prevalence']:.4f} |")
    healthy = sorted({name for result in results for name in result["healthy_flagged_ml"]})
    lines += ["", "Volume flagged (mL) on healthy scans at each model's calibrated threshold "
              "(1% healthy voxel false-positive rate on the calibration set), and seconds per volume (CPU):", "",
              "| model | " + " | ".join(healthy) + " | s / volume |", "|---|" + "---|" * (len(healthy) + 1)]
    for result in results:
        lines.append(f"| {result['model']} | " + " | ".join(f"{result['healthy_flagged_ml'][h]:.1f}" for h in healthy)
                     + f" | {result['seconds_per_volume']:.1f} |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], cases: list[dict], path: Path) -> None:
    """One row per model; for each shown case: input (truth in green), pseudo-healthy, anomaly map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in cases if c["case"] in results[0]["maps"]]
    columns = 3 * len(shown)
    fig, axes = plt.subplots(len(results), columns, figsize=(1.7 * columns, 2.0 * len(results) + 0.4), squeeze=False)
    for index, case in enumerate(shown):
        image = sitk.GetArrayFromImage(sitk.DICOMOrient(read_volume(case["image"]), "LPS"))
        truth = (sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(case["mask"])), "LPS")) > 0
                 if case["mask"] else np.zeros(image.shape, bool))
        k = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else image.shape[0] // 2
        low, high = np.percentile(image, [1, 99.5])
        for row, result in enumerate(results):
            healthy, scores, threshold = result["maps"][case["case"]]
            healthy = sitk.GetArrayFromImage(sitk.DICOMOrient(healthy, "LPS"))
            scores = sitk.GetArrayFromImage(sitk.DICOMOrient(scores, "LPS"))
            left = 3 * index
            axes[row, left].imshow(image[k], cmap="gray", vmin=low, vmax=high)
            if truth[k].any():
                axes[row, left].contour(truth[k], [0.5], colors="lime", linewidths=0.6)
            axes[row, left + 1].imshow(healthy[k], cmap="gray", vmin=low, vmax=high)
            axes[row, left + 2].imshow(scores[k], cmap="inferno", vmin=0, vmax=2 * threshold)
            if index == 0:
                axes[row, 0].set_ylabel(result["model"], fontsize=9)
            if row == 0:
                axes[0, left].set_title(f"{case['case']}\ninput", fontsize=7)
                axes[0, left + 1].set_title("pseudo-healthy", fontsize=7)
                axes[0, left + 2].set_title("anomaly map", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _cache_folder(root: Path, model: str, cases: list[dict], shown: list[str]) -> Path:
    """A folder named after what the results depend on: the package's card and weights, the
    cases' files and the figure's cases."""
    import hashlib

    package = resolve_model(model)
    digest = hashlib.sha256(json.dumps(package.card, sort_keys=True).encode())
    for case in cases:
        for path in (case["image"], case["mask"]):
            if path is not None:
                digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    digest.update(",".join(shown).encode())
    return root / f"{package.name}-{digest.hexdigest()[:16]}"


def save_cached(root: Path, model: str, cases: list[dict], shown: list[str], result: dict) -> None:
    folder = _cache_folder(root, model, cases, shown)
    folder.mkdir(parents=True, exist_ok=True)
    for case, (healthy, scores, threshold) in result["maps"].items():
        sitk.WriteImage(healthy, str(folder / f"{case}_pseudo_healthy.nii.gz"))
        sitk.WriteImage(scores, str(folder / f"{case}_anomaly_map.nii.gz"))
    entry = {k: v for k, v in result.items() if k != "maps"}
    entry["map_thresholds"] = {case: maps[2] for case, maps in result["maps"].items()}
    (folder / "result.json").write_text(json.dumps(entry, indent=2) + "\n")


def load_cached(root: Path, model: str, cases: list[dict], shown: list[str]) -> dict | None:
    folder = _cache_folder(root, model, cases, shown)
    if not (folder / "result.json").is_file():
        return None
    result = json.loads((folder / "result.json").read_text())
    thresholds = result.pop("map_thresholds")
    result["maps"] = {case: (sitk.ReadImage(str(folder / f"{case}_pseudo_healthy.nii.gz")),
                             sitk.ReadImage(str(folder / f"{case}_anomaly_map.nii.gz")), threshold)
                      for case, threshold in thresholds.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="registered names or package folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure-cases", nargs="*", help="cases shown in the figure (default: one per type)")
    parser.add_argument("--cache", type=Path, help="keep each model's results here and reuse them while the "
                        "model's card and weights and the cases are unchanged (adding a model to the table "
                        "then evaluates only that model)")
    args = parser.parse_args(argv)
    cases = find_cases(args.data)
    if not cases:
        raise SystemExit(f"no cases found in {args.data}")
    shown = args.figure_cases or list({c["type"]: c["case"] for c in reversed(cases)}.values())
    results, registrations = [], Registrations()
    for model in args.models:
        cached = load_cached(args.cache, model, cases, shown) if args.cache else None
        if cached is not None:
            print(f"{model}: from the cache", flush=True)
            results.append(cached)
            continue
        print(f"{model}: {len(cases)} cases", flush=True)
        results.append(evaluate_model(model, cases, set(shown), registrations))
        if args.cache:
            save_cached(args.cache, model, cases, shown, results[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, cases)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "maps"} for r in results],
                                                      indent=2) + "\n")
    figure(results, cases, args.out / "examples.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
