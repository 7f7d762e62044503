#!/usr/bin/env bash
# The web app on this machine: set up .venv with the web requirements, then normative-anomaly serve.
#   scripts/serve.sh [--port 8080] [--input FILE] [--data-dir FOLDER] ...   (see: normative-anomaly serve --help)
# Headless rendering needs OSMesa (Debian: apt-get install libosmesa6).
source "$(dirname "$0")/_environment.sh" requirements-web.txt
exec normative-anomaly serve "$@"
