#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test requirements, then pytest.
#   scripts/test.sh [pytest options]         the fast set (-m "not slow"): a few minutes, while you work
#   scripts/test.sh --all [pytest options]   everything (what CI runs, .ci/run)
source "$(dirname "$0")/_environment.sh" requirements-test.txt
if [ "${1:-}" = "--all" ]; then
  shift
  python -m pytest "$@"
else
  python -m pytest -m "not slow" "$@"
fi
