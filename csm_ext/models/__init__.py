"""Models: autoregressive context networks + the shared energy head, on one base class; and the
maximum-likelihood baselines (mixture conditionals) on the same context networks."""
from .base import ARCSM, DEFAULT_NODES, OBJECTIVES, SAMPLERS
from .common import ARModel
from .made import MADECSM, MaskedLinear
from .mixture import MADEMixture, MixtureAR, PixelCNNppMixture
from .pixelcnnpp import PixelCNNppCSM

__all__ = ["ARCSM", "DEFAULT_NODES", "OBJECTIVES", "SAMPLERS", "MADECSM", "MaskedLinear",
           "PixelCNNppCSM", "ARModel", "MixtureAR", "MADEMixture", "PixelCNNppMixture"]
