#!/usr/bin/env bash
# CI step: compile and link the CUDA kernels (no GPU needed), import them, run the CPU suite.
#
# Uses a second venv (.venv-cuda) with the pinned CUDA torch and the local CUDA toolkit. The
# build runs in a copy of the tree (build/cuda-tree): an editable build writes csm_ext/_C*.so
# next to the sources, and the CPU venv's build there must stay as it is.
#
#   bash scripts/ci_cuda_build.sh            # CUDA build check + the default suite
#   bash scripts/ci_cuda_build.sh -k head    # extra arguments go to pytest
#
# Knobs: CSM_CUDA_VENV (venv folder), TORCH_CUDA_ARCH_LIST (default 9.0: one architecture is
# enough to check that the kernels compile and link, at half the time of "8.0;9.0+PTX"),
# MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
source scripts/env.sh
VENV="${CSM_CUDA_VENV:-$ROOT/.venv-cuda}"
TREE="$ROOT/build/cuda-tree"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$SECONDS

echo "== cuda set-up: $VENV with torch==$TORCH_CUDA_VERSION"
make_venv "$VENV" "$TORCH_CUDA_VERSION"
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' has no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== cuda build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) in $TREE"
rm -rf "$TREE"
mkdir -p "$TREE"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked files plus untracked ones git does not ignore (what a clean clone would hold).
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$TREE"
else
  tar --exclude=./build --exclude='./.venv*' --exclude='*.so' -cf - . | tar -xf - -C "$TREE"
fi
build_start=$SECONDS
(cd "$TREE" && build_package "$VENV")
echo "   build took $((SECONDS - build_start)) s"

echo "== cuda import check"
(cd "$TREE" && "$VENV/bin/python" - <<'EOF'
import json
import torch
import csm_ext

info = csm_ext.build_info()
print(json.dumps(info))
assert info["cuda"] is True, "csm_ext was built without its CUDA kernels"
# The CUDA kernels are registered with the dispatcher (this needs no GPU).
for op in ("head_jets", "head_jets_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csm_ext::{op}", "CUDA"), op
print("CUDA kernels registered for head_jets and head_jets_backward")
EOF
)

echo "== tests (CPU suite in the CUDA build; CUDA tests skip without a GPU)"
(cd "$TREE" && "$VENV/bin/python" -m pytest -q "$@")
echo "== cuda build check took $((SECONDS - start)) s"
