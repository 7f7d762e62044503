#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the bundled demo case through the
# default model. Outputs go to a new out/demo-<time>/ folder (or the folder given).
#   scripts/demo.sh [OUT_DIR] [more normative-anomaly demo options]
source "$(dirname "$0")/_environment.sh" requirements.txt
out=${1:-out/demo-$(date +%Y%m%d-%H%M%S)}
shift || true
normative-anomaly demo --out "$out" "$@"
