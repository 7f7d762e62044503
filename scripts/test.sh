#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test requirements, then pytest.
#   scripts/test.sh [pytest options]
source "$(dirname "$0")/_environment.sh" requirements-test.txt
python -m pytest "$@"
