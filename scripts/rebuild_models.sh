#!/usr/bin/env bash
# Rebuild everything the shipped models derive from, from a fresh clone, then the evaluation:
# fetch the real anatomies, build the healthy T1, T2 and FLAIR populations, train every model of
# the zoo (the DAEs also on the healthy tissue of the BraTS development cases, in folds: needs
# ../shared/data/brats-dev), recalibrate the baseline, install the packages into Resources/Models,
# rebuild the test sets and the evaluation tables. About four hours on 2 CPU cores (most of it training: see
# each config's "steps" and the model table in docs/models.md); much less on a GPU ("device": "cuda"
# in the configs). Uses the same .venv as scripts/test.sh.
#   scripts/rebuild_models.sh
set -e
BRATS=../shared/data/brats-dev
[ -d "$BRATS" ] || { echo "the DAEs learn from the BraTS development cases: $BRATS is missing" >&2; exit 1; }
source "$(dirname "$0")/_environment.sh" requirements.txt
python scripts/fetch_data.py
python scripts/build_resources.py --only template,template_t2
python scripts/synthesise_flair_template.py
python scripts/build_population.py
python scripts/build_population.py --modality T2
python scripts/build_population.py --modality FLAIR
T1_MODELS="dae-t1 ae-t1 vae-t1 gan-t1 ddpm-t1 ddpm-simplex-t1 ae3d-t1"
for name in dae-t2 $T1_MODELS; do
  config="scripts/configs/${name//-/_}.json"
  # ddpm-simplex-t1 continues ddpm-t1's training (1500 steps, coarse noise) with simplex noise
  if [ "$name" = ddpm-simplex-t1 ] && [ ! -f out/checkpoints/ddpm-simplex-t1.pt ]; then
    cp out/checkpoints/ddpm-t1.pt out/checkpoints/ddpm-simplex-t1.pt
  fi
  python scripts/train.py "$config" --overwrite
  rm -rf "Resources/Models/$name" && cp -r "out/models/$name" "Resources/Models/$name"
done
# dae-t1-brats and dae-flair learn from patients' healthy tissue too (train_cases): folds for the
# evaluation, then the package on every case. dae-flair starts from dae-t2's weights.
for name in dae-t1-brats dae-flair; do
  scripts/train_folds.sh "scripts/configs/${name//-/_}.json"
  rm -rf "Resources/Models/$name" && cp -r "out/models/$name" "Resources/Models/$name"
done
python scripts/build_resources.py --only intensity
scripts/fit_bundled_normative.sh
python scripts/make_test_set.py
python scripts/make_test_set.py --modality T2
python scripts/evaluate.py --data data/testset --models intensity-t1 $T1_MODELS --out docs/evaluation
python scripts/evaluate.py --data data/testset_t2 --models dae-t2 --out docs/evaluation/t2
python scripts/evaluate_brats.py --folds out/models/*-fold-?
