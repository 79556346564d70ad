"""Data for AR-CSM: 2-D toy densities with exact log-densities, a correlated Gaussian with known
conditional scores, and image sets (embedded MNIST 5k, sklearn digits, IDX, CIFAR-10) with the
dequantisation / rescaling / smoothing-noise preprocessing CSM needs."""
from .images import (ImageData, Preprocess, load_cifar10, load_digits8, load_idx, load_images,
                     load_mnist5k, load_mnist_idx, mnist5k_path, read_idx)
from .sources import GaussianSource, ImageSource, ToySource, make_source, source_from_spec
from .toys import (TOYS, Checkerboard, CorrelatedGaussian, EightGaussians, Funnel, Rings,
                   TwoSpirals, get_toy)

__all__ = ["ImageData", "Preprocess", "load_cifar10", "load_digits8", "load_idx", "load_images",
           "load_mnist5k", "load_mnist_idx", "mnist5k_path", "read_idx", "TOYS", "Checkerboard",
           "CorrelatedGaussian", "EightGaussians", "Funnel", "Rings", "TwoSpirals", "get_toy",
           "GaussianSource", "ImageSource", "ToySource", "make_source", "source_from_spec"]
