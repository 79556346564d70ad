#!/usr/bin/env bash
# The one script for a lent GPU machine (an H200 with Python 3.12 and torch 2.11 preinstalled,
# its own nvcc, no network): build csm_ext against that torch, run the CUDA tests (head jets and
# quadrature ops), the CUDA benchmarks (head op, then head_logz), then as much of the rest of the
# suite as the time allows.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # from the repository root or anywhere
#
# Everything goes under $OUT (at most 8 files):
#   gpu_check.log   the machine (GPU, versions), phase headers, each phase's tail, the summary
#   build.log       the build                                          test_cuda.log
#   bench_cuda.log  the head benchmark's table    bench_cuda.json       test_rest.log
#   bench_logz.log  the head_logz benchmark's table (fused vs reference)  bench_logz.json
# The whole run ends within GPU_CHECK_BUDGET_S seconds (default 450, under 8 minutes with
# margin): every phase runs under `timeout`, limited by what is left of that budget, and a
# phase that fails or times out does not stop the next (the benchmark runs even when a test
# fails; only a failed build skips what needs it). Exit status: 0 when every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
T0=$SECONDS
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET_S:-450}))
FAILED=0
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# run_phase NAME LOGFILE CAP RESERVE CMD...: run CMD with output to $OUT/LOGFILE, for at most
# CAP seconds and never into the last RESERVE seconds of the budget (kept for later phases).
run_phase() {
  local name="$1" logfile="$OUT/$2" cap="$3" reserve="$4"
  shift 4
  local limit=$((DEADLINE - SECONDS - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 15)); then
    say "== $name: SKIPPED (only ${limit} s left of the budget)"
    SUMMARY+=("$name: skipped (no time left)")
    FAILED=1
    return 99
  fi
  say "== [t+$((SECONDS - T0)) s] $name (limit ${limit} s): $*"
  local start=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$logfile" 2>&1
  rc=$?
  local took=$((SECONDS - start)) verdict="ok"
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED (rc=$rc)"
  tail -n 40 "$logfile" | sed 's/^/    /' >>"$LOG"
  say "== $name: $verdict in ${took} s (full output: $(basename "$logfile"))"
  SUMMARY+=("$name: $verdict in ${took} s")
  ((rc != 0)) && FAILED=1
  return $rc
}

# ---- 1. the machine (into gpu_check.log: $OUT holds at most 8 files) ---------------------------
ENV_LOG="$(mktemp)"
{
  date -u
  nvidia-smi || true
  echo "python: $(command -v "$PY")"
  "$PY" - <<'EOF' || true
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
  nvcc --version | tail -n 2 || true
  echo "cpus: $(nproc)"
} >"$ENV_LOG" 2>&1
sed 's/^/    /' "$ENV_LOG" >>"$LOG"
rm -f "$ENV_LOG"

# Compile for this GPU only (fast), with every core.
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FORCE_CUDA=1

# ---- 2. build against the machine's torch (no network: no build isolation, no dependencies) --
build_and_check() {
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  "$PY" - <<'EOF'
import json, torch, csm_ext
info = csm_ext.build_info()
print(json.dumps(info))
assert info["cuda"] is True, "built without CUDA kernels"
assert torch.cuda.is_available(), "torch sees no GPU"
for op in ("head_jets", "head_jets_backward", "head_node_energies", "head_node_energies_backward",
           "head_logz", "head_logz_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csm_ext::{op}", "CUDA"), op
EOF
}
export PY
export -f build_and_check  # `timeout` runs programs, not shell functions
run_phase "build" build.log 240 210 bash -c build_and_check
BUILD_OK=$?

if ((BUILD_OK == 0)); then
  # ---- 3. the CUDA tests (per-test limit so one hang cannot eat the budget) -------------------
  TIMEOUT_OPT=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=150)
  run_phase "cuda tests" test_cuda.log 210 170 \
    "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_cuda_logz.py -q -rfEs \
    -p no:cacheprovider "${TIMEOUT_OPT[@]}"

  # ---- 4. the CUDA benchmarks (the head_logz one keeps 75 s of its own) ------------------------
  run_phase "cuda benchmark" bench_cuda.log 200 95 \
    "$PY" benchmarks/bench_head.py --device cuda --sizes 1e5,1e6,1e7 --hidden 64,128 \
    --layers 2 --out "$OUT/bench_cuda.json"
  # head_logz, fused vs the (N, G, H) reference, N = 784·64, H 64, L 2, G 64/256/1024.
  run_phase "cuda logz benchmark" bench_logz.log 75 20 \
    "$PY" benchmarks/bench_logz.py --device cuda --n 50176 --nodes 64,256,1024 --hidden 64 \
    --layers 2 --repeats 7 --budget 12 --out "$OUT/bench_logz.json"

  # ---- 5. the rest of the suite, in parallel when pytest-xdist is there -----------------------
  XDIST_OPT=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST_OPT=(-n 8)
  run_phase "rest of the suite" test_rest.log 300 0 \
    "$PY" -m pytest -q -rfE -p no:cacheprovider -m "not slow and not cuda" \
    --ignore=tests/test_cuda.py --ignore=tests/test_cuda_logz.py "${XDIST_OPT[@]}"
else
  say "== build failed: tests and benchmark skipped (see build.log)"
  SUMMARY+=("cuda tests: skipped (no build)" "cuda benchmark: skipped (no build)"
            "cuda logz benchmark: skipped (no build)" "rest of the suite: skipped (no build)")
fi

say "== summary (total $((SECONDS - T0)) s)"
for line in "${SUMMARY[@]}"; do say "   $line"; done
exit $FAILED
