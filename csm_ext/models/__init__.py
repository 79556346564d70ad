"""Models: context networks + the shared energy head."""
from .made import MADECSM, MaskedLinear
from .pixelcnnpp import PixelCNNppCSM

__all__ = ["MADECSM", "MaskedLinear", "PixelCNNppCSM"]
