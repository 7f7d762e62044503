#!/usr/bin/env bash
# A model that learns healthy tissue from patients' scans (its config's train_cases), trained
# three times: on each half of the cases (the folds that score the other half in
# scripts/evaluate_brats.py --folds) and on all of them (the package that ships, its card
# listing every case). Writes out/models/<name>-fold-a, -fold-b and <name>; training resumes from
# out/checkpoints/<name>*.pt where they exist (delete them to train anew).
#   scripts/train_folds.sh scripts/configs/dae_flair.json
set -e
source "$(dirname "$0")/_environment.sh" requirements.txt
config="$1"
read_config="from NormativeAnomalyLib.training.config import load_config; import sys; c = load_config(sys.argv[1])"
name=$(python -c "$read_config; print(c['name'])" "$config")
cases=$(python -c "$read_config; print(' '.join(c['train_cases']['cases']))" "$config")
read -r -a all <<< "$cases"
fold_a=() fold_b=()
for i in "${!all[@]}"; do  # alternate cases, so that each fold has cases of every origin
  if (( i % 2 == 0 )); then fold_a+=("${all[$i]}"); else fold_b+=("${all[$i]}"); fi
done
python scripts/train.py "$config" --cases "${fold_a[@]}" --out "out/models/$name-fold-a" \
  --checkpoint "out/checkpoints/$name-fold-a.pt" --overwrite
python scripts/train.py "$config" --cases "${fold_b[@]}" --out "out/models/$name-fold-b" \
  --checkpoint "out/checkpoints/$name-fold-b.pt" --overwrite
python scripts/train.py "$config" --overwrite
