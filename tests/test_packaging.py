"""Packaging guards, all fast (nothing is compiled):

* the build requirements hold neither torch nor `wheel`, and a build that cannot see an installed
  torch (what pip's and `python -m build`'s isolated builds are) stops at once in setup.py with the
  command to run, instead of compiling against a torch of its own;
* the sdist holds every file of the checkout and none of the build artefacts;
* a native library that does not load raises an ImportError naming the torch it was built
  against, the running torch, the original error and the rebuild command.

scripts/ci_sdist.sh does the slow end-to-end part: sdist -> wheel -> fresh venv -> import.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import csm_ext
from csm_ext import _native

ROOT = Path(__file__).resolve().parents[1]
HINT = "csm_ext must be compiled against the torch you will run it with"
# What pip runs first in an isolated build (before installing anything but setuptools).
GET_REQUIRES = "from setuptools import build_meta; build_meta.get_requires_for_build_wheel()"

needs_setup_py = pytest.mark.skipif(not (ROOT / "setup.py").exists(),
                                    reason="needs the source tree (setup.py)")


def run_python(code: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_build_requirements_have_neither_torch_nor_wheel():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [Requirement(req).name.lower() for req in pyproject["build-system"]["requires"]]
    # torch in the build requirements makes an isolated build download and compile against a
    # torch of its own; `wheel` makes `python -m build --no-isolation` stop on a missing package.
    assert "torch" not in names and "wheel" not in names, names
    assert "setuptools" in names


@needs_setup_py
def test_build_without_torch_stops_with_the_command_to_run():
    # sys.modules["torch"] = None makes `import torch` fail, as in an isolated build environment.
    result = run_python("import sys; sys.modules['torch'] = None\n" + GET_REQUIRES, cwd=ROOT)
    assert result.returncode != 0
    assert HINT in result.stderr, result.stderr
    assert "MAX_JOBS=2 pip install --no-build-isolation ." in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def _fake_torch(site: Path) -> None:
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(
        "__version__ = '9.9.9+cu999'\nclass version:\n    cuda = '99.9'\n")


@needs_setup_py
@pytest.mark.parametrize("env_dir", ["pip-build-env-k3j2x9", "build-env-a1b2c3"])
def test_build_refuses_a_torch_from_an_isolated_build_env(tmp_path, env_dir):
    site = tmp_path / env_dir / "overlay" / "lib" / "python3.11" / "site-packages"
    _fake_torch(site)
    result = run_python(GET_REQUIRES, cwd=ROOT, env={"TMPDIR": str(tmp_path),
                                                     "PYTHONPATH": str(site)})
    assert result.returncode != 0
    assert "isolated build environment" in result.stderr, result.stderr
    assert HINT in result.stderr and "Traceback" not in result.stderr, result.stderr


@needs_setup_py
def test_build_accepts_an_env_merely_named_like_one(tmp_path):
    """A conda env called build-env-3 is not a temporary build environment."""
    site = tmp_path / "envs" / "build-env-3" / "lib" / "python3.11" / "site-packages"
    _fake_torch(site)
    result = run_python(GET_REQUIRES, cwd=ROOT, env={"TMPDIR": str(tmp_path), "FORCE_CUDA": "0",
                                                     "PYTHONPATH": str(site)})
    # It gets past the check and fails later, at the fake torch's missing torch.utils.
    assert "isolated build environment" not in result.stderr, result.stderr
    assert "No module named 'torch.utils'" in result.stderr, result.stderr


def _git_files() -> list[str] | None:
    """The files of a clean clone (tracked + untracked-not-ignored), or None outside a checkout."""
    if shutil.which("git") is None:
        return None
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True,
                         text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        return None
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def test_sdist_holds_every_source_and_no_build_artefacts(tmp_path):
    files = _git_files()
    if files is None:
        pytest.skip("needs a git checkout of csm_ext")
    src = tmp_path / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    junk = ["csm_ext/_C.cpython-311-x86_64-linux-gnu.so", "csm_ext/_build_meta.py",
            "csm_ext/__pycache__/ops.cpython-311.pyc", "tests/__pycache__/conftest.cpython-311.pyc",
            "build/temp.linux-x86_64-cpython-311/csrc/ops.o", "runs/demo/last.pt",
            "benchmarks/results/head.json.tmp", "benchmarks/__pycache__/bench_head.cpython-311.pyc",
            "csrc/ops.o", "tests/.pytest_cache/README.md", ".pytest_cache/README.md",
            "dist/old.tar.gz", ".venv/bin/python"]
    for name in junk:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("junk\n")
    out = tmp_path / "dist"
    result = run_python(f"from setuptools import build_meta; "
                        f"print(build_meta.build_sdist({str(out)!r}))", cwd=src)
    assert result.returncode == 0, result.stderr[-4000:]
    with tarfile.open(out / result.stdout.strip().splitlines()[-1]) as archive:
        names = {m.name.split("/", 1)[1] for m in archive.getmembers()
                 if m.isfile() and "/" in m.name}
    # Everything of a clean clone but git's and CI's own files.
    wanted = {f for f in files if not f.startswith((".ci/", ".git"))}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"
    included = sorted(set(junk) & names)
    assert not included, f"the sdist holds build artefacts {included}: exclude them in MANIFEST.in"


def _import_csm_ext(prelude: str, tmp_path: Path):
    """`import csm_ext` in a fresh interpreter after `prelude`, with this csm_ext on the path."""
    pkg_parent = str(Path(csm_ext.__file__).resolve().parents[1])
    return run_python(textwrap.dedent(prelude) + "\nimport csm_ext\n", cwd=tmp_path,
                      env={"PYTHONPATH": pkg_parent})


BROKEN_LIBRARY = '''
import sys, types

class BrokenLibrary:  # what importing csm_ext._C raises when its libraries cannot be loaded
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "csm_ext._C":
            raise {error}

sys.meta_path.insert(0, BrokenLibrary)
'''


@pytest.mark.parametrize("location", [
    "/tmp/pip-build-env-x/overlay/lib/python3.11/site-packages/torch",  # a plain `pip install .`
    "/opt/envs/cuda/lib/python3.11/site-packages/torch",                # another env's torch
])
def test_failed_load_names_both_torches_and_the_rebuild_command(tmp_path, location):
    prelude = BROKEN_LIBRARY.format(error='ImportError("libc10_cuda.so: cannot open shared '
                                          'object file: No such file or directory")') + f'''
meta = types.ModuleType("csm_ext._build_meta")
meta.TORCH_VERSION, meta.TORCH_CUDA, meta.WITH_CUDA = "2.99.0+cu130", "13.0", True
meta.TORCH_LOCATION = {location!r}
sys.modules["csm_ext._build_meta"] = meta
'''
    result = _import_csm_ext(prelude, tmp_path)
    assert result.returncode != 0
    err = result.stderr
    assert "ImportError: csm_ext's native library csm_ext._C could not be loaded" in err, err
    assert "libc10_cuda.so: cannot open shared object file" in err
    assert f"built against torch 2.99.0+cu130 (CUDA 13.0) from {location}" in err
    assert f"this Python runs torch {torch.__version__}" in err
    if "pip-build-env-" in location:
        assert "the torch of an isolated build environment" in err, err
    elif torch.version.cuda is None:
        assert "built against a CUDA torch but runs under a CPU one" in err, err
    else:
        assert "versions differ" in err, err
    assert "MAX_JOBS=2 pip install --no-build-isolation -e ." in err
    assert "MAX_JOBS=2 pip install --no-build-isolation ." in err


def test_missing_library_says_it_is_not_compiled(tmp_path):
    prelude = BROKEN_LIBRARY.format(
        error='ModuleNotFoundError("No module named \'csm_ext._C\'", name="csm_ext._C")') + '''
sys.modules["csm_ext._build_meta"] = None  # no build record either
'''
    result = _import_csm_ext(prelude, tmp_path)
    assert result.returncode != 0
    assert "csm_ext is not compiled here" in result.stderr, result.stderr
    assert f"This Python runs torch {torch.__version__}" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_build_records_the_torch_it_compiled_against():
    meta = _native.build_meta()
    assert meta is not None, ("no csm_ext/_build_meta.py: setup.py writes it when it builds "
                              "csm_ext._C; rebuild with MAX_JOBS=2 pip install "
                              "--no-build-isolation -e .")
    assert meta["torch"] == csm_ext._C.TORCH_VERSION == torch.__version__
    assert meta["torch_cuda"] == torch.version.cuda
    assert meta["with_cuda"] == bool(csm_ext._C.WITH_CUDA)


def test_load_warns_when_built_against_another_torch(monkeypatch):
    monkeypatch.setattr(_native._C, "TORCH_VERSION", "0.0.1")
    with pytest.warns(RuntimeWarning, match="built against torch 0.0.1 but this Python runs"):
        assert _native.load() is _native._C
