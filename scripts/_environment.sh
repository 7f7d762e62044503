# Sourced by scripts/demo.sh and scripts/test.sh: create .venv once and install the pinned
# requirements into it (again only when a requirements file changes).
# NORMATIVE_ANOMALY_VENV chooses another location.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requirements=$1
venv=${NORMATIVE_ANOMALY_VENV:-.venv}
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv ..." >&2
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(cat requirements*.txt "$requirements" pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing pinned requirements ($requirements) into $venv ..." >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: a loose torch requirement would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$(grep '^torch==' requirements.txt)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
