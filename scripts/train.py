#!/usr/bin/env python3
"""Train a normative model from a JSON config and write its package.

    python scripts/train.py scripts/configs/dae_t1_tiny.json [--out DIR] [--steps N]

The config is plain data (see scripts/configs/): the template, the healthy data to train on
and the data held out for calibration, as volume files ("train_volumes",
"calibration_volumes": any NIfTI/NRRD files, so a user's own healthy cohort works the same
way; "registered": false registers them to the template first) and/or populations prebuilt by
scripts/build_population.py ("train_population", "calibration_population"),
the network (a monai.networks.nets class and its arguments), steps, batch size, noise.
Training resumes from "checkpoint" when that file exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))

from NormativeAnomalyLib.training import train_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", help="package folder (overrides the config's)")
    parser.add_argument("--steps", type=int, help="training steps (overrides the config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    base = args.config.resolve().parent
    def resolve(path: str) -> str:  # paths in a config are relative to the config file
        return str((base / path).resolve())

    for key in ("train_volumes", "calibration_volumes"):
        config[key] = [resolve(p) for p in config.get(key, [])]
    for key in ("out", "checkpoint", "train_population", "calibration_population"):
        if config.get(key):
            config[key] = resolve(config[key])
    if args.out:
        config["out"] = str(Path(args.out).resolve())
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
