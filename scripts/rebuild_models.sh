#!/usr/bin/env bash
# Rebuild everything the shipped models derive from, from a fresh clone, then the evaluation:
# fetch the real anatomies, build the healthy population, retrain the DAE, recalibrate the
# baseline, install both into Resources/Models, rebuild the test set and the evaluation table.
# About an hour on 2 CPU cores (most of it training). Uses the same .venv as scripts/test.sh.
#   scripts/rebuild_models.sh
source "$(dirname "$0")/_environment.sh" requirements.txt
python scripts/fetch_data.py
python scripts/build_population.py
python scripts/train.py scripts/configs/dae_t1.json --overwrite
rm -rf Resources/Models/dae-t1 && cp -r out/models/dae-t1 Resources/Models/dae-t1
python scripts/build_resources.py --only intensity
python scripts/make_test_set.py
python scripts/evaluate.py --data data/testset --models intensity-t1 dae-t1 --out docs/evaluation
