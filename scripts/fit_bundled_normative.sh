#!/usr/bin/env bash
# Location-aware scoring for the bundled default models: fit each one's healthy residual
# statistics on the healthy tissue of the BraTS development cases (../shared/data/brats-dev,
# see its README), in place in Resources/Models. About 3 minutes per model on 2 CPU cores.
# A DAE that learnt from these cases takes each case's residual from its fold that did not
# (out/models/<name>-fold-a and -b, scripts/train_folds.sh). scripts/evaluate_brats.py then
# scores them leave-one-case-out.
#   scripts/fit_bundled_normative.sh [DATA]
set -e
source "$(dirname "$0")/_environment.sh" requirements.txt
DATA="${1:-../shared/data/brats-dev}"
NOTE="the healthy tissue of the 10 BraTS 2018 development cases (real, skull-stripped, 1 mm; Menze et al. 2015, Bakas et al. 2017, 2018)"
folds() { echo --folds out/models/"$1"-fold-a out/models/"$1"-fold-b; }
# The T1 and T2 defaults add the structural dissimilarity (1 - SSIM, weight 0.5) to their residual;
# dae-t2 at 0.4% (at 0.5% it flags 5.2 mL outside the BraTS tumours), dae-t1 at 0.2% (the earlier
# dae-t1 at 0.5% flagged 6.7 mL on the healthy KmeansTest head: scripts/healthy_heads.py)
python scripts/fit_normative.py --model dae-t2 --data "$DATA" --suffix _t2.nii.gz --out Resources/Models/dae-t2 \
  --overwrite --residual positive --scan-scale --ssim-weight 0.5 --default-fpr 0.004 --data-note "$NOTE"
for name in dae-t1 dae-t1-brats; do
  python scripts/fit_normative.py --model $name --data "$DATA" --suffix _t1.nii.gz --out Resources/Models/$name \
    --overwrite --residual negative --scan-scale --default-fpr "$( [ $name = dae-t1 ] && echo 0.002 || echo 0.005 )" \
    --n4 with_skull --data-note "$NOTE" $( [ $name = dae-t1 ] && echo --ssim-weight 0.5 ) \
    $( [ $name = dae-t1-brats ] && folds dae-t1-brats )
done
python scripts/fit_normative.py --model dae-flair --data "$DATA" --suffix _flair.nii.gz \
  --out Resources/Models/dae-flair --overwrite --residual positive --scan-scale --input-weight 1 \
  --default-fpr 0.005 --data-note "$NOTE" $(folds dae-flair)
python scripts/synthesise_flair_template.py
python scripts/fit_normative.py --model intensity-t1 --name intensity-flair --modality FLAIR \
  --template icbm152_2009c_flair_2mm --data "$DATA" --suffix _flair.nii.gz --out Resources/Models/intensity-flair \
  --overwrite --residual positive --default-fpr 0.01 --data-note "$NOTE" \
  --description "Normative FLAIR intensity: the input's FLAIR intensity as a deviation from healthy FLAIR tissue at the same template location (per-voxel mean and spread of healthy tissue, scripts/fit_normative.py). No network and no pseudo-healthy reconstruction (its pseudo_healthy output is the input). Registered to a FLAIR-like template synthesised from the ICBM 2009c T1 and T2 (scripts/synthesise_flair_template.py)." \
  --license "Code Apache-2.0; its FLAIR-like template derives from ICBM 2009c under the MNI notice (Resources/Licenses/MNI-ICBM152.txt)" \
  --training-data "none: no network; its location statistics are in scoring.normative"
