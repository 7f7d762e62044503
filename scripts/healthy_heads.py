#!/usr/bin/env python3
"""Volume flagged on real healthy heads at each model's default threshold: the false positives a user sees.

    python scripts/healthy_heads.py [--models dae-t1 ...] [--n4 card|on|off]

The heads are the real single-subject T1 scans that ship in the repository (Testing/Data: ITK's
KmeansTest head with skull, nibabel's small anatomical scan) and, where scripts/fetch_data.py
has fetched it, the skull-stripped Colin27 (data/raw). Every run is the full pipeline
(registration, the model, scoring, the 50 mm^3 minimum lesion size of the card). Default: the
default T1 model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import numpy as np

from NormativeAnomalyLib.models import available_models, resolve_model
from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
from NormativeAnomalyLib.volume_io import read_volume

HEADS = {
    "kmeans_head": REPO / "Testing" / "Data" / "itk_kmeans_t1.nii.gz",
    "nibabel_anatomical": REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz",
    "colin27_stripped": REPO / "data" / "raw" / "colin27" / "t1_brain.nii",
}


def flagged_ml(model: str, path: Path, n4: bool | None) -> tuple[float, float]:
    """(mL flagged at the default threshold, alignment); ``n4`` None: the card's setting."""
    run = detect_anomalies(read_volume(path), resolve_model(model),
                           RunOptions(device="cpu", accept_poor_alignment=True, bias_correction=n4))
    voxel_ml = float(np.prod(run.input_image.GetSpacing())) / 1000
    return float(run.segmentation.mask.sum()) * voxel_ml, run.alignment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="default: the default T1 model")
    parser.add_argument("--n4", choices=["card", "on", "off"], default="card",
                        help="N4 bias-field correction: as the model card says (default), always, never")
    args = parser.parse_args(argv)
    models = args.models or [entry["name"] for entry in available_models()
                             if entry["default_for_modality"] and resolve_model(entry["name"]).card["modality"] == "T1"]
    heads = {name: path for name, path in HEADS.items() if path.is_file()}
    print(f"| model | {' | '.join(heads)} |")
    print(f"|---|{'---|' * len(heads)}")
    for model in models:
        cells = []
        for path in heads.values():
            ml, alignment = flagged_ml(model, path, {"card": None, "on": True, "off": False}[args.n4])
            cells.append(f"{ml:.1f} mL (alignment {alignment:.2f})")
        print(f"| {model} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
