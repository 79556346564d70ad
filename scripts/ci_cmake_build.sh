#!/usr/bin/env bash
# CI: build the C++ sources against libtorch with CMake (the C++ users' path) and run the C++
# smoke test. Uses the CPU venv that scripts/test.sh created.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CSM_VENV:-.venv}"
prefix="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B build-cmake -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
  -DPython_EXECUTABLE="$VENV/bin/python" >/dev/null
cmake --build build-cmake -j "${MAX_JOBS:-2}"
./build-cmake/csm_ext_smoke
