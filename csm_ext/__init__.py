"""csm_ext: fused kernels and models for Autoregressive Score Matching (AR-CSM) in PyTorch.

The core pieces:

* :class:`EnergyHead` — per-dimension energies with their first and second x-derivatives,
  from one fused pass (``csm_ext.ops.head_jets``);
* :func:`csm_loss` — the Composite Score Matching loss ``Σ_d ½(E_d')² − E_d''``;
* :func:`build_info` — how the native library was built;
* :func:`denoise`, :func:`anomaly_scores`, :func:`auroc` — single-step Tweedie denoising and
  anomaly scores of a trained model (:mod:`csm_ext.applications`).
"""
from __future__ import annotations

import torch

# The native library loads first, through the one loader that explains a failed load (torch
# built against vs running, and the rebuild command).
from ._native import _C
from . import ops, reference
from .head import BACKENDS, EnergyHead
from .loss import csm_loss, csm_loss_from_jets
from . import applications
from .applications import anomaly_scores, auroc, denoise

__version__ = "0.1.0"

__all__ = ["EnergyHead", "BACKENDS", "csm_loss", "csm_loss_from_jets", "build_info", "ops",
           "reference", "__version__", "applications", "denoise", "anomaly_scores", "auroc"]


def build_info() -> dict:
    """How the native library was built: ``cuda`` (CUDA kernels compiled in), ``openmp``
    (CPU kernels parallel over elements), ``torch`` (the torch version it was built against),
    plus the running torch and its thread count."""
    return {
        "cuda": bool(_C.WITH_CUDA),
        "openmp": bool(_C.WITH_OPENMP),
        "torch": _C.TORCH_VERSION,
        "torch_runtime": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "version": __version__,
    }
