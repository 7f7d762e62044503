#!/usr/bin/env python3
"""Train a normative model from a JSON config and write its package.

    python scripts/train.py scripts/configs/dae_t1_tiny.json [--out DIR] [--steps N]

The config is plain data (see scripts/configs/; "extends" names a config it varies, as the
*_gpu.json ones do): the template, the healthy data to train on
and the data held out for calibration, as volume files ("train_volumes",
"calibration_volumes": any NIfTI/NRRD files, so a user's own healthy cohort works the same
way; "registered": false registers them to the template first) and/or populations prebuilt by
scripts/build_population.py ("train_population", "calibration_population"),
the network (a monai.networks.nets class and its arguments), steps, batch size, noise.
Patients' scans can lend their healthy tissue ("train_cases": folder, file suffix, cases; each
lesion label, dilated by a margin, is left out of the loss): train folds with --cases and
evaluate each fold only on the cases it did not see (scripts/evaluate_brats.py --folds).
"initialise_from" starts from a bundled package's weights. Training resumes from "checkpoint"
when that file exists.

    python scripts/train.py scripts/configs/dae_flair.json --cases Brats18_2013_11_1 ... \
        --out out/models/dae-flair-fold-1 --checkpoint out/checkpoints/dae-flair-fold-1.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from NormativeAnomalyLib.training import train_model
from NormativeAnomalyLib.training.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", help="package folder (overrides the config's)")
    parser.add_argument("--steps", type=int, help="training steps (overrides the config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    parser.add_argument("--cases", nargs="+", help="the patients' scans to learn from (overrides train_cases.cases)")
    parser.add_argument("--checkpoint", help="checkpoint file (overrides the config's)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.cases:
        if not config.get("train_cases"):
            parser.error("--cases: the config has no train_cases")
        config["train_cases"] = {**config["train_cases"], "cases": args.cases}
    if args.out:
        config["out"] = str(Path(args.out).resolve())
    if args.checkpoint:
        config["checkpoint"] = str(Path(args.checkpoint).resolve())
    if args.steps is not None:
        config["steps"] = args.steps
    config["overwrite"] = args.overwrite or config.get("overwrite", False)
    from tqdm import tqdm

    with tqdm(total=config["steps"], desc="training", unit="step") as bar:
        def progress(step: int, loss: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.refresh()

        package = train_model(config, progress)
    if package is None:  # not process 0 of a torchrun launch
        return 0
    print(f"wrote {package.path} (final loss {package.card['training']['final_loss']}, "
          f"threshold at 1% healthy FPR {package.calibration.threshold_for_fpr(0.01):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
