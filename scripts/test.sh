#!/usr/bin/env bash
# The test command: from a fresh clone, set up a local venv with the pinned torch, build
# csm_ext, and run the default test suite. Extra arguments go to pytest.
#
#   bash scripts/test.sh            # default suite (fast; slow tests deselected)
#   bash scripts/test.sh -m slow    # the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV="${CSM_VENV:-.venv}"

echo "== set-up: $VENV with torch==$TORCH_CPU_VERSION"
make_venv "$VENV" "$TORCH_CPU_VERSION"
echo "== build"
build_package "$VENV"
"$VENV/bin/python" -c "import csm_ext, json; print(json.dumps(csm_ext.build_info()))"
echo "== tests"
# pytest exits non-zero (5) when no test is collected, so an empty run fails too.
"$VENV/bin/python" -m pytest -q "$@"
