#!/usr/bin/env bash
# The GPU check (issue 6, "The GPU path"): the one prepared script a session lent a GPU machine
# runs there. About 3-5 minutes on an H200; everything goes to $OUT/gpu-check.log.
#
#   1. Here, once, where a package registry answers:   scripts/gpu_check.sh --prepare
#      packs what the GPU machine's image lacks (its python3 has CUDA torch, numpy, scipy,
#      safetensors, einops, matplotlib, pytest; not SimpleITK, MONAI, nibabel, jsonschema) into
#      out/gpu-carry/site.tar.xz. SimpleITK's wheel alone is 53 MB zipped, too much beside the
#      30 MB working tree for the 64 MiB transfer; xz brings the whole set to about 30 MB.
#   2. There, through the device tool:
#        run(command="bash scripts/gpu_check.sh", carry=["out/gpu-carry"], timeout_s=540)
#      or, with a Python environment that has the requirements: VENV=/path/to/venv bash scripts/gpu_check.sh
#
# What it runs: nvidia-smi; the tests marked gpu (Testing/test_gpu_path.py: fp32 and autocast
# against the CPU, batches sized from free memory, a real CUDA out-of-memory fallback);
# scripts/benchmark_models.py --device cuda on the demo case (model time runs on the template
# grid, so it does not depend on the input: the CPU column of docs/performance.md used the MNI152 1 mm T1).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARRY=out/gpu-carry
# Missing on the GPU image, at the versions requirements.txt pins (jsonschema's parts as .venv has them).
PACKAGES=(SimpleITK==2.5.7 monai==1.6.1 nibabel==5.4.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
          referencing==0.37.0 rpds-py==2026.9.1)

if [ "${1:-}" = "--prepare" ]; then
  set -e
  python=${VENV:-.venv}/bin/python
  rm -rf "$CARRY" /tmp/gpu-carry-site && mkdir -p "$CARRY" /tmp/gpu-carry-wheels
  # The GPU machine's python3 is CPython 3.12 on x86-64 (KINDS.md).
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/gpu-carry-wheels "${PACKAGES[@]}"
  for wheel in /tmp/gpu-carry-wheels/*.whl; do
    "$python" -m zipfile -e "$wheel" /tmp/gpu-carry-site  # a wheel is a zip of its site-packages files
  done
  tar -C /tmp/gpu-carry-site -cf - . | xz -6 -T0 > "$CARRY/site.tar.xz"
  rm -rf /tmp/gpu-carry-site
  echo "$(du -h "$CARRY/site.tar.xz" | cut -f1) in $CARRY/site.tar.xz; working tree $(git ls-files -co --exclude-standard -z | du -ch --files0-from=- | tail -1 | cut -f1)"
  exit 0
fi

OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
fail() { echo "gpu_check: $*"; exit 2; }

if [ -x "${VENV:-.venv}/bin/python" ]; then
  python=${VENV:-.venv}/bin/python
else
  python=python3
  if [ -f "$CARRY/site.tar.xz" ]; then
    mkdir -p /tmp/gpu-site && tar -C /tmp/gpu-site -xJf "$CARRY/site.tar.xz" || fail "cannot unpack $CARRY/site.tar.xz"
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
echo "== python: $python; $(date -u +%FT%TZ)"
"$python" - <<'EOF' || fail "the environment is not ready (above); run scripts/gpu_check.sh --prepare here and carry out/gpu-carry, or set VENV"
import importlib.util, sys
missing = [name for name in ("torch", "numpy", "scipy", "SimpleITK", "monai", "nibabel", "jsonschema", "safetensors",
                             "einops", "pytest") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
EOF

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"

echo "== pytest -m gpu (Testing/test_gpu_path.py)"
reliability=()
grep -q -- "--reliability-log" Testing/conftest.py && reliability=(--reliability-log "$OUT/reliability-gpu.jsonl")
timeout 300 "$python" -m pytest -m gpu Testing/test_gpu_path.py -v -s -p no:cacheprovider "${reliability[@]}"
tests=$?

echo "== scripts/benchmark_models.py --device cuda (demo case)"
timeout 240 "$python" scripts/benchmark_models.py --device cuda --repeats 3 --input Resources/SampleData/demo_t1.nii.gz
benchmark=$?

echo "== done: tests exit $tests, benchmark exit $benchmark (1: a model missed its CPU target; 124: timed out)"
[ "$tests" -eq 0 ] || exit 1
