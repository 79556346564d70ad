#!/usr/bin/env bash
# CI step: what users install from works.
#  1. `python -m build --sdist --no-isolation` makes an sdist that holds every file of a clean
#     checkout (sources, headers, CUDA files, CMakeLists.txt, tests, scripts, docs) and no build
#     artefacts;
#  2. a plain `pip install <sdist>` (build isolation on) stops at once with the command to run,
#     instead of compiling against a torch of its own;
#  3. `python -m build --wheel --no-isolation` run in the unpacked sdist compiles csm_ext._C (the
#     only compile of this script: it proves the sdist builds) and makes a wheel with the library
#     and its build record;
#  4. that wheel installs (with its dependencies, not editable) into the fresh venv, and from a
#     folder outside the checkout csm_ext imports, its op matches the reference (values and
#     gradients), and the `csm-ext` command runs.
#
# Uses a venv made afresh each run (.venv-sdist: pinned CPU torch, build) and build/sdist-check/
# for the copy of the tree, the sdist, the wheel and the logs. Knobs: CSM_SDIST_VENV, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
source scripts/env.sh
VENV="${CSM_SDIST_VENV:-$ROOT/.venv-sdist}"
WORK="$ROOT/build/sdist-check"
PY="$VENV/bin/python"
start=$SECONDS

# run_logged LOG CMD...: run CMD with its output in LOG; on failure show the end of LOG.
run_logged() {
  local log="$1"; shift
  if ! "$@" >"$log" 2>&1; then
    echo "FAILED: $* (last lines of $log):" >&2
    tail -n 60 "$log" >&2
    return 1
  fi
}

echo "== sdist set-up: fresh $VENV with torch==$TORCH_CPU_VERSION, build"
rm -rf "$VENV" "$WORK"
mkdir -p "$WORK/tree" "$WORK/dist" "$WORK/unpacked"
run_logged "$WORK/venv.log" make_venv "$VENV" "$TORCH_CPU_VERSION"
run_logged "$WORK/tools.log" "$PY" -m pip install build "setuptools>=70.1"

# The files of a clean clone: tracked plus untracked ones git does not ignore.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 \
    && [ "$(git rev-parse --show-toplevel)" = "$ROOT" ]; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/tree"
else
  tar --exclude=./build --exclude='./.venv*' --exclude='*.so' --exclude=__pycache__ \
    --exclude=./csm_ext/_build_meta.py -cf - . | tar -xf - -C "$WORK/tree"
fi

echo "== sdist: python -m build --sdist --no-isolation"
(cd "$WORK/tree" && run_logged "$WORK/sdist.log" "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist")
sdist="$(ls "$WORK"/dist/*.tar.gz)"
echo "   $sdist"

echo "== sdist contents"
"$PY" - "$sdist" "$WORK/tree" <<'EOF'
import sys, tarfile
from pathlib import Path

sdist, tree = sys.argv[1], Path(sys.argv[2])
with tarfile.open(sdist) as archive:
    names = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile() and "/" in m.name}
# The files a build needs (once missing from the sdist); then every file of the clean checkout.
must = ["csrc/head_math.h", "csrc/head_checks.h", "csrc/ops.cpp", "csrc/python_module.cpp",
        "csrc/cpu/head_jets_cpu.cpp", "csrc/cuda/head_jets_cuda.cu", "csrc/cuda/head_jets_cuda.h",
        "csrc/cuda/head_jets_block.h", "csrc/cuda/head_jets_cuda_torch.cpp", "CMakeLists.txt",
        "tests/conftest.py", "tests/cpp/smoke.cpp", "tests/cuda_emulator.cpp", "scripts/env.sh",
        "LICENSE", "README.md", "BENCHMARKS.md", "MANIFEST.in", "pyproject.toml", "setup.py",
        "csm_ext/py.typed"]
checkout = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
wanted = must + [f for f in checkout if not f.startswith((".ci/", ".git"))]
missing = sorted({f for f in wanted if f not in names})
if missing:
    sys.exit("the sdist lacks these files (add them to MANIFEST.in):\n  " + "\n  ".join(missing))
junk = sorted(n for n in names if n.endswith((".so", ".o", ".pyc", ".tmp"))
              or "__pycache__/" in n or n == "csm_ext/_build_meta.py"
              or n.startswith(("build/", "dist/", "runs/", ".venv")))
if junk:
    sys.exit("the sdist holds build artefacts (exclude them in MANIFEST.in):\n  " + "\n  ".join(junk))
print(f"   {len(names)} files; all {len(set(wanted))} of the checkout's, no build artefacts")
EOF

echo "== isolated build: a plain 'pip install <sdist>' must stop at once with the command to run"
# Nothing is downloaded but setuptools: torch is not a build requirement, and setup.py stops
# when it cannot import torch (the torch installed in $VENV is hidden by the isolation).
if timeout 300 "$PY" -m pip install --no-deps "$sdist" >"$WORK/isolated.log" 2>&1; then
  echo "FAILED: 'pip install $sdist' with build isolation succeeded; it must refuse" >&2
  exit 1
fi
if ! grep -q "csm_ext must be compiled against the torch you will run it with" "$WORK/isolated.log" \
    || ! grep -q -- "pip install --no-build-isolation" "$WORK/isolated.log"; then
  echo "FAILED: the isolated build did not stop with the build hint; its output:" >&2
  tail -n 40 "$WORK/isolated.log" >&2
  exit 1
fi
if "$PY" -m pip show -q csm_ext >/dev/null 2>&1; then
  echo "FAILED: the refused isolated build left csm_ext installed" >&2
  exit 1
fi
echo "   refused, with the hint (see $WORK/isolated.log)"

echo "== wheel: python -m build --wheel --no-isolation in the unpacked sdist (MAX_JOBS=$MAX_JOBS)"
tar -xzf "$sdist" -C "$WORK/unpacked"
src="$(ls -d "$WORK"/unpacked/*/)"
build_start=$SECONDS
(cd "$src" && run_logged "$WORK/wheel.log" "$PY" -m build --wheel --no-isolation --outdir "$WORK/dist")
echo "   compile + wheel took $((SECONDS - build_start)) s"
wheel="$(ls "$WORK"/dist/*.whl)"
echo "   $wheel"
"$PY" - "$wheel" <<'EOF'
import fnmatch, sys, zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
for pattern in ("csm_ext/_C*.so", "csm_ext/_build_meta.py", "csm_ext/_native.py",
                "csm_ext/__init__.py", "csm_ext/py.typed", "csm_ext-*.dist-info/entry_points.txt"):
    if not fnmatch.filter(names, pattern):
        sys.exit(f"the wheel lacks {pattern}")
stray = [n for n in names if n.startswith(("tests/", "csrc/", "scripts/", "benchmarks/"))]
if stray:
    sys.exit(f"the wheel holds non-package files: {stray[:5]}")
print(f"   {len(names)} files, csm_ext/_C*.so and csm_ext/_build_meta.py among them")
EOF

echo "== install the wheel into $VENV (not editable, with its dependencies)"
run_logged "$WORK/install.log" "$PY" -m pip install "$wheel"

echo "== smoke check from outside the checkout"
outside="$(mktemp -d)"
trap 'rm -rf "$outside"' EXIT
(cd "$outside" && env -u PYTHONPATH "$PY" - <<'EOF'
import json, os, sysconfig

import torch

import csm_ext
from csm_ext import ops, reference

site = os.path.realpath(sysconfig.get_paths()["platlib"])
where = os.path.realpath(csm_ext.__file__)
assert where.startswith(site + os.sep), f"csm_ext imported from {where}, not from {site}"
print("   csm_ext from", os.path.dirname(where))
info = csm_ext.build_info()
print("  ", json.dumps(info))
assert info["torch"] == torch.__version__, info
meta = csm_ext._native.build_meta()
assert meta is not None and meta["torch"] == torch.__version__, meta

g = torch.Generator().manual_seed(0)
N, H, L = 9, 6, 3
# Scaled as tests/conftest.py's make_head_args: (z, x, u, W, b, w).
shapes = [((N, H), 1.0), ((N,), 1.0), ((H,), 1.0), ((L - 1, H, H), H ** -0.5), ((L - 1, H), 0.5),
          ((H,), H ** -0.5)]
args = [(torch.randn(*s, generator=g, dtype=torch.float64) * k).requires_grad_(True)
        for s, k in shapes]
weights = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]


def jets_and_grads(fn):
    out = fn(*args, 0.3, "softplus")
    total = sum((o * w).sum() for o, w in zip(out, weights))
    return [o.detach() for o in out], torch.autograd.grad(total, args)


fused, fused_grads = jets_and_grads(ops.head_jets)
ref, ref_grads = jets_and_grads(reference.head_jets_ref)
# float64, absolute tolerance scaled by the magnitude (as tests/test_head_op.py does).
pairs = list(zip(("E", "dE", "d2E"), fused, ref))
pairs += [(f"grad {n}", a, b) for n, a, b in zip("z x u W b w".split(), fused_grads, ref_grads)]
for name, a, b in pairs:
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale, msg=lambda m: f"{name}: {m}")
print("   head_jets and its backward match the reference (float64)")
EOF
)
(cd "$outside" && "$VENV/bin/csm-ext" --help >"$WORK/cli.log" 2>&1) || {
  echo "FAILED: csm-ext --help:" >&2; cat "$WORK/cli.log" >&2; exit 1; }
grep -q "train" "$WORK/cli.log" || { echo "FAILED: csm-ext --help does not list 'train'" >&2; exit 1; }
echo "   csm-ext --help runs"
echo "== sdist check took $((SECONDS - start)) s"
