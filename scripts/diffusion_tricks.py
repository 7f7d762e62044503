#!/usr/bin/env python3
"""Do the published diffusion tricks help on real lesions? Samples, spread, noise levels, THOR harmonisation
and pDDPM-style patches, measured in template space.

    python scripts/diffusion_tricks.py [--model ddpm-t1] [--data ../shared/data/brats-dev] [--out docs/evaluation]
                                       [--samples 3] [--noise-levels 150 250 350] [--cases N] [--threads 1]
                                       [--render] [--reuse]

Each BraTS development case is registered once to the model's template as the pipeline does for a
skull-stripped scan (affine, to the template's brain), goes into model space with its own brain mask,
and the expert label (whole tumour, label > 0) is warped by the same transform (nearest neighbour).
The diffusion model then reconstructs it on the CPU in fp32 (torch's seed fixed before each run; the
diffusion noise comes from the library's own seeded generator, so every run is reproducible):

- baseline: the card's diffusion settings (1 sample);
- samples averaged: ``samples`` S reconstructions (one run, ``diffusion={"samples": S}``), the mean's residual;
- spread-scored: the same S samples, |input - mean| divided per voxel by the samples' standard deviation
  plus a floor (the 10th percentile of the in-brain standard deviation);
- noise levels averaged: one reconstruction per noise level (1 sample each), averaged; the average's residual
  (the card's own level is the baseline's reconstruction when its settings are the same). Twice: with each
  level's noise drawn independently (each extra level seeded with its own number through the card's
  diffusion ``seed``), and as the library does by default (every run seeded alike: the levels share one
  noise field, only its scale differs, so their errors are correlated);
- THOR harmonisation: the card's settings with ``harmonise`` (healthy-looking tissue pulled back to the
  noised input after each step);
- patch-wise (pDDPM-style): the card's settings with ``patch_grid`` (one tile noised at a time, the rest of
  the slice its clean context);
- and, at no extra inference: the uncertainty alone (the samples' standard deviation as the map) and each
  extra noise level alone.

Every map is scored as the pipeline scores (``scoring.anomaly_map``: residual, median filter, eroded brain)
and compared with the warped label inside the model-space brain: AUPRC and best Dice, mean over cases,
and seconds of inference per case. Threshold-free only: the card's calibration was fitted for its own
settings and is not refitted for these variants. Writes diffusion-tricks.md and diffusion-tricks.json
into ``--out`` after each case (figures only, no voxels).

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

from NormativeAnomalyLib.evaluation import auprc, best_dice, lesion_cases
from NormativeAnomalyLib.inference import diffusion_settings, run_on_model_input
from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.progress import Monitor
from NormativeAnomalyLib.scoring import anomaly_map, scoring_mask
from NormativeAnomalyLib.training.scans import LESION_SUFFIX, prepare_scan
from NormativeAnomalyLib.volume_io import read_volume

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats-dev"
CITATION = ("BraTS 2018: Menze et al., IEEE TMI 2015; Bakas et al., Scientific Data 2017; "
            "Bakas et al., arXiv:1811.02629 (2018)")
FLOOR_PERCENTILE = 10.0  # of the in-brain standard deviation: the spread's floor
SEED = 0
HARMONISE = 0.15  # THOR: departures (model units) below this are pulled back to the input
PATCH_GRID = 2  # pDDPM-style: tiles a side, restored one at a time from their clean context
# Variants that need runs of their own, by the runs they need; --reuse runs only those a case lacks.
GROUPS = {"samples": ("samples_mean", "spread", "uncertainty"), "levels": ("levels_mean", "levels_mean_independent"),
          "thor": ("thor",), "patches": ("patches",)}
NAME = "diffusion-tricks"


def variant_names(settings: dict, samples: int, levels: list[int]) -> dict[str, str]:
    """Variant key -> its label in the table, in the table's order."""
    names = {"baseline": f"baseline (card: noise level {settings['noise_level']}, 1 sample)",
             "samples_mean": f"{samples} samples averaged",
             "spread": f"{samples} samples, spread-scored",
             "levels_mean_independent": f"noise levels {'+'.join(str(level) for level in levels)} averaged "
                                        "(independent noise)",
             "levels_mean": f"noise levels {'+'.join(str(level) for level in levels)} averaged (shared noise field)",
             "uncertainty": f"uncertainty alone (std of {samples} samples)",
             "thor": f"THOR harmonisation (harmonise {HARMONISE}, 1 sample)",
             "patches": f"patch-wise, pDDPM-style ({PATCH_GRID}x{PATCH_GRID} tiles, 1 sample; inference only)"}
    for level in levels:
        if level != settings["noise_level"]:
            names[f"level_{level}"] = f"noise level {level} alone (1 sample)"
    return names


def reconstruct(package, model_input, diffusion: dict | None) -> tuple:
    """One inference run on the CPU in fp32, seeded: (Inference, seconds)."""
    torch.manual_seed(SEED)
    start = time.perf_counter()
    inference = run_on_model_input(package, model_input, torch.device("cpu"), Monitor(), None, diffusion, "fp32")
    return inference, time.perf_counter() - start


def evaluate_case(package, folder: Path, case: str, samples: int, levels: list[int],
                  stored: dict | None = None) -> dict:
    """One case's maps and figures (template space); ``stored``: this case's row from an earlier run,
    whose variants are kept and not run again."""
    have = set((stored or {}).get("variants", {}))
    wanted = {group for group, keys in GROUPS.items() if not set(keys) <= have}
    card, template = package.card, package.template
    scoring = card["scoring"]
    image = read_volume(folder / f"{case}_{card['modality'].lower()}.nii.gz")
    label = sitk.ReadImage(str(folder / f"{case}{LESION_SUFFIX}"), sitk.sitkUInt8)
    model_input, truth, registration = prepare_scan(image, template, card["preprocessing"], label, skull_stripped=True)
    inside = model_input.brain_mask
    x = model_input.image
    spacing_zyx = tuple(reversed(template.image.GetSpacing()))

    def score(reconstruction, image_=x, settings=scoring):
        return anomaly_map(image_, reconstruction, inside, spacing_zyx, settings, None)

    baseline_settings = diffusion_settings(package, None)
    seconds: dict[str, float] = {}
    maps: dict[str, np.ndarray] = {}

    base, seconds["baseline"] = reconstruct(package, model_input, None)
    maps["baseline"] = score(base.reconstruction)
    inference_seconds = {"baseline": seconds["baseline"]}

    std = floor = None
    if "samples" in wanted:
        several, seconds[f"{samples}_samples"] = reconstruct(package, model_input, {"samples": samples})
        maps["samples_mean"] = score(several.reconstruction)
        std = np.sqrt(np.maximum(several.variance, 0.0))
        floor = max(float(np.percentile(std[inside], FLOOR_PERCENTILE)), 1e-6)
        spread = std + floor
        # |x/s - m/s| = |x - m| / s (s > 0): the card's residual of the spread-scaled inputs, then its median
        # filter and eroded brain, exactly as anomaly_map scores a plain residual.
        maps["spread"] = score(several.reconstruction / spread, x / spread)
        # The uncertainty map as the score: no reconstruction means the "image" itself is scored.
        maps["uncertainty"] = score(None, std, {**scoring, "residual": "absolute"})
        for key in GROUPS["samples"]:
            inference_seconds[key] = seconds[f"{samples}_samples"]

    if "levels" in wanted:
        by_level, independent = {}, {}
        for level in levels:
            if diffusion_settings(package, {"noise_level": level}) == baseline_settings:
                # the same settings, seed and noise: the baseline's run
                by_level[level] = independent[level] = base.reconstruction
                continue
            run, seconds[f"level_{level}"] = reconstruct(package, model_input, {"noise_level": level})
            by_level[level] = run.reconstruction
            maps[f"level_{level}"] = score(run.reconstruction)
            inference_seconds[f"level_{level}"] = seconds[f"level_{level}"]
            run, seconds[f"level_{level}_seed_{level}"] = reconstruct(package.with_diffusion(seed=level), model_input,
                                                                       {"noise_level": level})
            independent[level] = run.reconstruction
        maps["levels_mean"] = score(np.mean([by_level[level] for level in levels], axis=0))
        maps["levels_mean_independent"] = score(np.mean([independent[level] for level in levels], axis=0))
        # the card's own level is the baseline's run: its seconds count once more here
        inference_seconds["levels_mean"] = sum(seconds.get(f"level_{level}", seconds["baseline"]) for level in levels)
        inference_seconds["levels_mean_independent"] = sum(
            seconds.get(f"level_{level}_seed_{level}", seconds["baseline"]) for level in levels)

    for group, variant in (("thor", package.with_diffusion(harmonise=HARMONISE)),
                           ("patches", package.with_diffusion(patch_grid=PATCH_GRID))):
        if group in wanted:
            run, seconds[group] = reconstruct(variant, model_input, None)
            inference_seconds[group] = seconds[group]
            maps[group] = score(run.reconstruction)

    scored = scoring_mask(inside, spacing_zyx, scoring["mask_erosion_mm"])
    healthy = scored & ~truth
    variants = {key: {"auprc": auprc(value[inside], truth[inside]),
                      "best_dice": best_dice(value[inside], truth[inside])[0],
                      "inference_seconds": inference_seconds[key]} for key, value in maps.items()}
    row = {"case": case, "tumour_ml": float(truth.sum() * np.prod(spacing_zyx) / 1000),
           "alignment": model_input.alignment, "registration_seconds": registration.seconds,
           "run_seconds": seconds, "variants": variants}
    if std is not None:
        row.update(std_floor=floor, std_tumour=float(std[scored & truth].mean()) if (scored & truth).any() else None,
                   std_healthy=float(std[healthy].mean()))
    if stored:  # kept from the earlier run: its variants (the baseline is this run's, the same seeded draw)
        row = {**stored, **row, "run_seconds": {**stored.get("run_seconds", {}), **seconds},
               "variants": {**stored["variants"], **variants}}
    return row


def summarise(rows: list[dict], names: dict[str, str]) -> dict:
    """Per variant, means over cases."""
    return {key: {measure: float(np.nanmean([row["variants"][key][measure] for row in rows]))
                  for measure in ("auprc", "best_dice", "inference_seconds")} for key in names}


def table(result: dict) -> str:
    lines = ["| Variant | AUPRC | Best Dice | Inference s / case |", "|---|---|---|---|"]
    for key, name in result["variants"].items():
        m = result["means"][key]
        lines.append(f"| {name} | {m['auprc']:.3f} | {m['best_dice']:.3f} | {m['inference_seconds']:.0f} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    settings, samples, levels = result["card_diffusion"], result["samples"], result["noise_levels"]
    rows = result["per_case"]
    spread_ratio = np.nanmean([row["std_tumour"] / row["std_healthy"] for row in rows
                               if row["std_tumour"] is not None])
    wins = {key: sum(row["variants"][key]["auprc"] > row["variants"]["baseline"]["auprc"] for row in rows)
            for key in result["variants"] if key != "baseline"}
    win_line = "; ".join(f"{result['variants'][key]} {count}/{len(rows)}" for key, count in wins.items())
    return f"""# Diffusion tricks on real lesions: samples, spread, noise levels, harmonisation, patches

Generated by `scripts/diffusion_tricks.py`; do not edit by hand.

Model `{result['model']}` ({settings['noise']} noise to step {settings['noise_level']} of
{settings['train_timesteps']}, {settings['steps']} DDIM steps back, {settings['samples']} sample by its card),
on {len(rows)} BraTS development case{'s' if len(rows) != 1 else ''} (T1, whole tumour). Each case is registered once to the template as
the pipeline does for a skull-stripped scan (affine, to the template's brain), brought into model space with
its own brain mask, and its expert label warped by the same transform (nearest neighbour). Inference on
the CPU in fp32; torch's seed is fixed before each run and the diffusion noise comes from the library's own
generator, seeded {SEED}, so every figure here is reproducible. The variants:

- **Baseline**: the card's settings, one reconstruction.
- **{samples} samples averaged**: one run with `samples: {samples}`; the map is the card's residual of the
  mean reconstruction.
- **Spread-scored**: the same {samples} samples; per voxel |input - mean| / (s + f), s the samples' standard
  deviation (square root of the library's variance), f its {FLOOR_PERCENTILE:g}th percentile over the model-space
  brain (so flat areas do not blow up). Computed as `scoring.anomaly_map(input / (s + f), mean / (s + f), ...)`:
  the same residual, {result['scoring']['median_filter_voxels']}-voxel median filter and brain eroded by
  {result['scoring']['mask_erosion_mm']:g} mm as every other map.
- **Noise levels averaged**: one reconstruction at each of noise levels {', '.join(map(str, levels))} (1 sample
  each; the level {settings['noise_level']} one is the baseline's own run, same settings), averaged; the
  residual of the average. Twice: with **independent noise** (each other level's noise generator seeded with
  the level's number, through a copy of the card with its diffusion `seed` set: a run cannot override it),
  and with the **shared noise field** every run gets by default (the library seeds each run's generator
  {SEED}, so the levels draw the same noise, only scaled differently, and their errors are correlated).
- **THOR harmonisation** (Bercea et al. 2024; `harmonise: {HARMONISE}` in a copy of the card): after each DDIM
  step, where the x0 estimate departs from the input by less than {HARMONISE} (model units, averaged over 5
  voxels a side) the sample is pulled towards the input noised to the next step, in proportion; so healthy
  tissue ends close to the input and what the model changes stays changed.
- **Patch-wise, pDDPM-style** (Behrendt et al. 2023; `patch_grid: {PATCH_GRID}`): each tile of a {PATCH_GRID}x{PATCH_GRID}
  grid is noised and restored in turn with the rest of the slice clean around it, {PATCH_GRID * PATCH_GRID} passes. Inference
  only: pDDPM trains its network on patch-noised slices, this network was trained on whole-slice noise, so
  it meets clean context it never saw.
- Extras at no further inference: the **uncertainty alone** (s, median-filtered and masked, as the map) and
  each extra **noise level alone** (default seed).

AUPRC and best Dice (its threshold chosen with the label: an upper bound) of each map against the warped
label inside the model-space brain, mean over cases; inference seconds per case on {result['threads']} torch
thread(s) of a 2-core machine shared with other work (for the levels' averages, the sum of their runs). Threshold-free only: the card's calibration
was fitted for its own settings and is not refitted for these variants, so none of them can yet be run
at a stated false-positive rate.

{table(result)}

Cases where a variant's AUPRC beats the baseline's: {win_line}. The samples' standard deviation is
{spread_ratio:.2f} times as high in the tumour as in the healthy scored brain (mean of per-case ratios).
The baseline and each noise level alone are one draw of the noise each: part of a small difference from
them is the draw, not the trick. THOR and the patch-wise variant draw the baseline's own noise (the same
seeded generator), so their difference from it is the trick's alone.

Data: {CITATION}. No voxels of the cases are stored here; per-case figures are in `{NAME}.json`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm-t1", help="a diffusion model package")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "evaluation")
    parser.add_argument("--samples", type=int, default=3, help="reconstructions averaged (at least 2)")
    parser.add_argument("--noise-levels", nargs="+", type=int, default=[150, 250, 350],
                        help="noise levels averaged, 1 sample each")
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--render", action="store_true", help=f"only rewrite {NAME}.md from {NAME}.json")
    parser.add_argument("--reuse", action="store_true",
                        help=f"keep the variants {NAME}.json already has for a case; run only the others")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / f"{NAME}.json").read_text())
        (args.out / f"{NAME}.md").write_text(markdown(saved))
        print(table(saved))
        return
    if args.samples < 2:
        parser.error("--samples must be at least 2 (a spread needs several samples)")
    package = resolve_model(args.model)
    if package.family != "ddpm":
        parser.error(f"{args.model} is not a diffusion model")
    scoring = package.card["scoring"]
    if scoring.get("input_weight") or scoring.get("ssim_weight"):
        parser.error("spread scoring rescales the residual's inputs: a card with input_weight or ssim_weight "
                     "would mix scaled intensities in")
    torch.set_num_threads(args.threads)
    cases = lesion_cases(args.data, args.cases)
    if not cases:
        raise SystemExit(f"no BraTS cases in {args.data}")
    settings = diffusion_settings(package)
    names = variant_names(settings, args.samples, args.noise_levels)
    stored = {}
    if args.reuse and (args.out / f"{NAME}.json").is_file():
        saved = json.loads((args.out / f"{NAME}.json").read_text())
        if (saved["model"], saved["samples"], saved["noise_levels"]) != (package.name, args.samples, args.noise_levels):
            parser.error(f"--reuse: {NAME}.json was made with another model, --samples or --noise-levels")
        stored = {row["case"]: row for row in saved["per_case"]}
    rows: list[dict] = []
    for case in cases:
        row = evaluate_case(package, args.data, case, args.samples, args.noise_levels, stored.get(case))
        rows.append(row)
        print(f"{case}: " + ", ".join(f"{key} {v['auprc']:.3f}/{v['best_dice']:.3f}"
                                      for key, v in row["variants"].items())
              + " (AUPRC/best Dice); runs " + ", ".join(f"{k} {s:.0f} s" for k, s in row["run_seconds"].items()),
              flush=True)
        result = {"model": package.name, "card_diffusion": settings, "scoring": scoring, "samples": args.samples,
                  "noise_levels": args.noise_levels, "std_floor_percentile": FLOOR_PERCENTILE, "seed": SEED,
                  "threads": args.threads, "citation": CITATION, "cases": [r["case"] for r in rows],
                  "variants": names, "means": summarise(rows, names), "per_case": rows}
        # Written after each case, so a long run keeps what it has measured.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{NAME}.md").write_text(markdown(result))
    print(table(result))


if __name__ == "__main__":
    main()
