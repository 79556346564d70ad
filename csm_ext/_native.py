"""The one place that loads csm_ext's native library, ``csm_ext._C``.

The library is C++ compiled against one torch: torch has no stable C++ ABI, so it loads (and is
correct) only under the torch it was built against. When loading fails, the ImportError raised
here says which torch the library was built against (recorded by setup.py in the generated,
untracked ``csm_ext/_build_meta.py``), which torch is running, the original error, and the command
that rebuilds it. Both ``csm_ext/__init__.py`` and ``csm_ext/ops.py`` take ``_C`` from here.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["REBUILD_EDITABLE", "REBUILD_INSTALL", "build_meta", "load", "load_error_message"]

# What to run, with the torch to be used already installed in the environment.
REBUILD_EDITABLE = "MAX_JOBS=2 pip install --no-build-isolation -e ."
REBUILD_INSTALL = "MAX_JOBS=2 pip install --no-build-isolation ."


def build_meta() -> dict | None:
    """How ``csm_ext._C`` was built, as recorded by setup.py: ``torch`` (version), ``torch_cuda``
    (torch's CUDA version, None for a CPU torch), ``with_cuda`` (CUDA kernels compiled in) and
    ``torch_location`` (where that torch was installed). None when no record exists."""
    try:
        from . import _build_meta as meta
    except ImportError:
        return None
    return {
        "torch": getattr(meta, "TORCH_VERSION", None),
        "torch_cuda": getattr(meta, "TORCH_CUDA", None),
        "with_cuda": getattr(meta, "WITH_CUDA", None),
        "torch_location": getattr(meta, "TORCH_LOCATION", None),
    }


def _describe(version, cuda) -> str:
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU only'})"


def load_error_message(err: BaseException, meta: dict | None) -> str:
    """The text of the ImportError raised when ``csm_ext._C`` cannot be loaded."""
    running = _describe(torch.__version__, torch.version.cuda)
    torch_dir = os.path.dirname(torch.__file__ or "")
    lines = [f"csm_ext's native library csm_ext._C could not be loaded: "
             f"{type(err).__name__}: {err}"]
    if meta is None:
        if isinstance(err, ModuleNotFoundError) and err.name == "csm_ext._C":
            lines.append("csm_ext is not compiled here (no csm_ext/_C*.so in "
                         f"{os.path.dirname(__file__)}).")
        else:
            lines.append("The torch it was built against is unknown (no csm_ext/_build_meta.py: "
                         "it was built by an older setup.py or by hand).")
        lines.append(f"This Python runs {running} from {torch_dir}.")
    else:
        built = _describe(meta["torch"], meta["torch_cuda"])
        lines.append(f"csm_ext was built against {built}"
                     + (f" from {meta['torch_location']}" if meta.get("torch_location") else "")
                     + f"; this Python runs {running} from {torch_dir}.")
        location = meta.get("torch_location") or ""
        if any(part.startswith(("pip-build-env-", "build-env-")) for part in location.split("/")):
            lines.append("It was built against the torch of an isolated build environment (a "
                         "plain `pip install .` or `python -m build`), fetched for that build "
                         "and gone since: not the torch this Python runs.")
        elif meta["torch_cuda"] and not torch.version.cuda:
            lines.append("It was built against a CUDA torch but runs under a CPU one (as after a "
                         "build in an isolated environment, which compiles against a torch of its "
                         "own, or after torch was reinstalled).")
        elif meta["torch"] != torch.__version__:
            lines.append("The two torch versions differ, and torch has no stable C++ ABI across "
                         "versions: the library must be rebuilt against the running torch.")
        else:
            lines.append("The torch versions match, so the error above is not a version "
                         "mismatch; the rebuild below replaces a damaged or stale library.")
    lines.append("csm_ext must be compiled against the torch it runs with. With that torch "
                 "installed, rebuild it:")
    lines += [f"    {REBUILD_EDITABLE}   # from a checkout (editable)",
              f"    {REBUILD_INSTALL}      # or a regular install (`.` or the path of an sdist)"]
    return "\n".join(lines)


def load():
    """Import and return ``csm_ext._C`` (loading it registers the ``csm_ext::`` ops).

    Raises ImportError with the built-against and running torch versions and the rebuild command
    when the library does not load; warns when it loads but was built against another torch."""
    try:
        lib = importlib.import_module("csm_ext._C")
    except (ImportError, OSError) as err:
        raise ImportError(load_error_message(err, build_meta())) from err
    built = getattr(lib, "TORCH_VERSION", None)
    if built not in (None, "unknown", torch.__version__):
        warnings.warn(
            f"csm_ext._C was built against torch {built} but this Python runs torch "
            f"{torch.__version__}; torch has no stable C++ ABI, so rebuild it: "
            f"{REBUILD_EDITABLE} (or without -e)", RuntimeWarning, stacklevel=2)
    return lib


_C = load()
