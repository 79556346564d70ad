"""Build script for csm_ext's native library (`csm_ext._C`).

CPU kernels (OpenMP) are always built. CUDA kernels are built when torch has CUDA and a CUDA
toolkit is found, or when FORCE_CUDA=1; FORCE_CUDA=0 turns them off. Install after torch with

    MAX_JOBS=2 pip install --no-build-isolation -e .

Environment knobs: FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX" when no
GPU is visible), MAX_JOBS, CSM_EXT_CPU_ARCH ("native" by default: the CPU kernels are compiled
for the building machine; set "" for a portable build).

The build compiles against the torch installed where it runs, and stops at once, with the command
to run, when there is none: pip's and `python -m build`'s default isolated build environments
hold no torch (pyproject.toml does not list torch as a build requirement, on purpose), and a build
against a torch fetched into one would succeed and then fail to import. Each build records the
torch it compiled against in the generated csm_ext/_build_meta.py, which csm_ext/_native.py
names when the library fails to load.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# What to run instead of an isolated build (the first line is the whole rule).
BUILD_HINT = """\
csm_ext must be compiled against the torch you will run it with: install torch first, then
`MAX_JOBS=2 pip install --no-build-isolation .`

    pip install torch                                  # the torch you will run csm_ext with
    MAX_JOBS=2 pip install --no-build-isolation .      # then csm_ext, compiled against it
    MAX_JOBS=2 pip install --no-build-isolation -e .   # (or editable, from a checkout)
    python -m build --no-isolation                     # (or an sdist + wheel; `pip install build`)

A build without --no-build-isolation (--no-isolation for `python -m build`) runs in a fresh
environment that hides the torch installed here."""


def isolated_build_env(path: Path) -> str | None:
    """The isolated build environment that `path` lies in (pip's pip-build-env-*, build's
    build-env-* in the temp folder, uv's cache builds-v*/.tmp*), or None."""
    path = path.resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("pip-build-env-", "build-env-")) and Path(*parts[:i]) == tmp:
            return str(Path(*parts[:i + 1]))
        if re.fullmatch(r"builds-v\d+", part) and parts[i + 1].startswith(".tmp"):
            return str(Path(*parts[:i + 2]))
    return None


def import_build_torch():
    """The torch to compile against: the one installed in the environment this build runs in.

    Exits with BUILD_HINT when there is none (the case of an isolated build, since torch is not a
    build requirement) or when the torch found was installed into an isolated build environment
    (if torch were put back into the build requirements)."""
    try:
        import torch
    except ImportError as err:
        sys.exit(f"error: this build cannot import torch ({type(err).__name__}: {err}; "
                 f"python: {sys.executable}).\n{BUILD_HINT}")
    env = isolated_build_env(Path(torch.__file__).parent)
    if env is not None:
        sys.exit(f"error: the torch this build found (torch {torch.__version__} in {env}) was "
                 f"installed into an isolated build environment, not the one csm_ext will run "
                 f"in.\n{BUILD_HINT}")
    return torch


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _toolkit_of(nvcc: str) -> Path | None:
    """The CUDA toolkit root for an nvcc path: the folder holding lib64/libcudart.

    On some machines `nvcc` on PATH is a wrapper script outside the toolkit that execs the real
    compiler; follow the path it names."""
    path = Path(nvcc).resolve()
    candidates = [path.parent.parent]
    try:
        text = path.read_text(errors="ignore") if path.stat().st_size < 65536 else ""
    except OSError:
        text = ""
    candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
    for root in candidates:
        if any((root / lib).exists() for lib in ("lib64/libcudart.so", "lib/libcudart.so",
                                                  "targets/x86_64-linux/lib/libcudart.so")):
            return root
    return None


def find_cuda_toolkit() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_of(nvcc)
        if root is not None:
            return root
    for root in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
        if (root / "bin" / "nvcc").exists():
            return root
    return None


def want_cuda(torch_module) -> tuple[bool, Path | None]:
    forced = _env_flag("FORCE_CUDA")
    toolkit = find_cuda_toolkit() if forced is not False else None
    if forced:
        if toolkit is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder "
                     "holding bin/nvcc and lib64/libcudart.so")
        return True, toolkit
    if forced is False:
        return False, None
    return bool(torch_module.version.cuda) and toolkit is not None, toolkit


def nvidia_wheel_include_dirs(toolkit: Path) -> list[str]:
    """Include folders of the nvidia-* pip packages that provide CUDA library headers the
    toolkit lacks (torch's CUDA headers include cuBLAS, cuSPARSE, cuSOLVER...)."""
    wanted = ["cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h", "nvtx3"]
    missing = [h for h in wanted if not (toolkit / "include" / h).exists()]
    dirs: list[str] = []
    for site in map(Path, sys.path):
        nvidia = site / "nvidia"
        if not nvidia.is_dir():
            continue
        for inc in sorted(nvidia.glob("*/include")) + sorted(nvidia.glob("*/*/include")):
            if any((inc / h).exists() for h in missing) and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def cpu_arch_flags() -> list[str]:
    arch = os.environ.get("CSM_EXT_CPU_ARCH", "native")
    return [f"-march={arch}"] if arch else []


def build_meta_source(torch_module, with_cuda: bool) -> str:
    """The text of csm_ext/_build_meta.py: the torch this build compiles against."""
    values = {
        "TORCH_VERSION": str(torch_module.__version__),
        "TORCH_CUDA": torch_module.version.cuda,
        "WITH_CUDA": with_cuda,
        "TORCH_LOCATION": str(Path(torch_module.__file__).resolve().parent),
    }
    return ("# Generated by setup.py when csm_ext._C is built (not tracked by git): the torch it\n"
            "# was compiled against. csm_ext/_native.py names it when the library fails to load.\n"
            + "".join(f"{key} = {value!r}\n" for key, value in values.items()))


def make_build_ext(base, meta_source: str):
    """`base` (torch's BuildExtension) that also writes csm_ext/_build_meta.py next to the built
    library: into the build folder (so wheels carry it) and, for in-place and editable builds,
    into the source package."""

    class BuildExtWithMeta(base):
        def run(self):
            super().run()
            targets = {Path(self.build_lib, "csm_ext").resolve()}
            if self.inplace:
                build_py = self.get_finalized_command("build_py")
                targets.add(Path(build_py.get_package_dir("csm_ext")).resolve())
            for folder in sorted(targets):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "_build_meta.py").write_text(meta_source)

    return BuildExtWithMeta


def build_extensions():
    torch = import_build_torch()

    use_cuda, toolkit = want_cuda(torch)
    if use_cuda:
        # cpp_extension reads CUDA_HOME when imported: point it at the real toolkit first.
        os.environ["CUDA_HOME"] = str(toolkit)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    define_macros = [("CSM_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    # No errno or FP traps (as torch itself builds): lets the jet loops vectorise, NaNs still propagate.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"] + cpu_arch_flags()
    extra = {"cxx": cxx_flags}
    kwargs = dict(extra_link_args=["-fopenmp"], define_macros=define_macros)
    if use_cuda:
        cuda_sources = sorted((ROOT / "csrc" / "cuda").glob("*.c*"))
        sources += [str(p.relative_to(ROOT)) for p in cuda_sources]
        define_macros.append(("WITH_CUDA", None))
        for inc in nvidia_wheel_include_dirs(toolkit):
            cxx_flags += ["-idirafter", inc]
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension("csm_ext._C", sources, extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension("csm_ext._C", sources, extra_compile_args=extra, **kwargs)
    build_ext = make_build_ext(BuildExtension.with_options(use_ninja=True),
                               build_meta_source(torch, use_cuda))
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = build_extensions()
setup(
    packages=find_packages(include=["csm_ext", "csm_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
