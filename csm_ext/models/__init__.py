"""Models: autoregressive context networks + the shared energy head, on one base class."""
from .base import ARCSM, DEFAULT_NODES, OBJECTIVES, SAMPLERS
from .made import MADECSM, MaskedLinear
from .pixelcnnpp import PixelCNNppCSM

__all__ = ["ARCSM", "DEFAULT_NODES", "OBJECTIVES", "SAMPLERS", "MADECSM", "MaskedLinear",
           "PixelCNNppCSM"]
