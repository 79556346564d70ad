"""Applications of a trained AR-CSM: single-step denoising and anomaly (out-of-distribution)
detection.

* :func:`denoise` — Tweedie's formula ``x̂ = y + σ²∇_y log q(y)``: for data ``y = x + σε``
  (ε standard normal) the posterior mean ``E[x | y]`` is that expression with the score of
  the density of the *noisy* data. A model trained on data smoothed with noise σ (as every
  image model of this package is) is a model of exactly that density, so one step denoises.
  ``method="joint"`` uses the normalised model's exact joint score
  (:meth:`~csm_ext.models.ARCSM.joint_score`); ``method="per-dim"`` the per-dimension
  conditional scores ``s_d = ∂_d log q(y_≤d)`` (:meth:`~csm_ext.models.ARCSM.score`), which
  give ``E[x_d | y_≤d]``: the same step, blind to the dimensions after d.
* :func:`anomaly_scores` — per-sample scores, **higher = more anomalous**: ``"nll"``
  (``−log q(x)``), ``"csm"`` (the per-sample CSM loss) and ``"score_norm"`` (``‖s(x)‖₂``);
  :func:`auroc` turns two sets of scores into the area under the ROC curve.
* helpers the ``csm-ext denoise`` / ``csm-ext anomaly`` commands and the benchmarks share:
  :func:`heldout_images`, :func:`noisy_pairs`, :func:`psnr`, :func:`ood_sets`,
  :func:`evaluate_denoising`, :func:`evaluate_anomaly`.

Every function works in the model's space (images: the affine map to [-1, 1], see
:class:`~csm_ext.data.Preprocess`), on batches, chunked by ``batch_size`` to bound memory.
"""
from __future__ import annotations

import functools
import glob
import math
import numbers
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DENOISERS", "SCORES", "OOD_SETS", "denoise", "anomaly_scores", "auroc", "psnr",
           "heldout_images", "noisy_pairs", "ood_sets", "load_ood_dir", "to_model_space",
           "evaluate_denoising", "evaluate_anomaly", "likelihood_failures", "save_rows_figure"]

DENOISERS = ("joint", "per-dim")
SCORES = ("nll", "csm", "score_norm")
# The built-in out-of-distribution sets of :func:`ood_sets`, in table order.
OOD_SETS = ("uniform", "gaussian", "permuted", "inverted", "constant", "digits8x8")


# ---------------------------------------------------------------- checks


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")


def _check_input(model, x, name):
    """x: a floating tensor (B, ...) whose per-sample size is the model's ``dim`` (if it has one)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor of shape (B, ...); got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension, shape (B, ...); got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")
    dim = getattr(model, "dim", None)
    if isinstance(dim, int) and math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{name} must hold {dim} values per sample (the model's dim), e.g. "
                         f"shape (B, {dim}); got {tuple(x.shape)}")


def _require_method(model, attr, what):
    if not callable(getattr(model, attr, None)):
        raise TypeError(f"{what} needs a model with a {attr}(x) method (e.g. a "
                        f"csm_ext.models.ARCSM); {type(model).__name__} has none")


# ---------------------------------------------------------------- denoising


def denoise(model, y: Tensor, sigma: float, method: str = "joint", batch_size: int = 256,
            nodes: int | None = None) -> Tensor:
    """Single-step Tweedie denoising of ``y = x + σε`` → ``x̂`` with the shape of y.

    ``method="joint"``: ``x̂ = y + σ²·∇_y log q(y)`` with the model's exact joint score
    (``model.joint_score``: the normalised model, so it needs ``model.support`` and y inside
    it). This is the posterior mean ``E[x | y]`` when q is the density of the noisy data, i.e.
    a model trained on data smoothed with noise of this same σ.
    ``method="per-dim"``: ``x̂_d = y_d + σ²·s_d(y)`` with the per-dimension conditional scores
    ``s_d = −∂E_d/∂y_d`` (``model.score``; no support needed), i.e. ``E[x_d | y_≤d]``.

    Works for any model with ``joint_score`` / ``score`` taking the model's input shape
    (``(B, D)`` for MADE-CSM, ``(B, C, H, W)`` or flat for PixelCNN++-CSM). The batch is processed
    in chunks of ``batch_size`` samples (the joint score back-propagates through the whole
    likelihood). ``nodes``: quadrature size of the joint score (default: the model's). The
    result is detached and not clamped. The model's train/eval mode is left as it is: call
    ``model.eval()`` first.
    """
    if method not in DENOISERS:
        raise ValueError(f"method must be one of {DENOISERS}; got {method!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (
            math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (the noise level of y); got {sigma!r}")
    _check_batch_size(batch_size)
    _check_input(model, y, "y")
    attr = "joint_score" if method == "joint" else "score"
    _require_method(model, attr, f"denoise(method={method!r})")
    if method == "joint" and hasattr(model, "support") and model.support is None:
        raise ValueError("denoise(method='joint') uses the normalised model's joint score, which "
                         "needs model.support = (lo, hi) (images: the data range widened by 4 "
                         "sigma); set it, or use method='per-dim'")
    s2 = float(sigma) ** 2
    out = []
    for i in range(0, y.shape[0], batch_size):
        yb = y[i:i + batch_size].detach()
        if method == "joint":
            g = model.joint_score(yb) if nodes is None else model.joint_score(yb, nodes)
        else:
            with torch.no_grad():
                g = model.score(yb)
        out.append(yb + s2 * g.detach().reshape(yb.shape))
    return torch.cat(out) if out else y.detach().clone()


def psnr(x: Tensor, ref: Tensor, peak: float = 2.0) -> Tensor:
    """Per-sample peak signal-to-noise ratio in dB, ``10·log10(peak² / MSE)``, (B,); ``peak``:
    the peak-to-peak range of the clean signal (2 for images in [-1, 1])."""
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape; got {tuple(x.shape)} and "
                         f"{tuple(ref.shape)}")
    mse = (x.double() - ref.double()).pow(2).reshape(x.shape[0], -1).mean(1)
    return 10 * torch.log10(peak ** 2 / mse)


# ---------------------------------------------------------------- anomaly scores


def _in_support_rows(model, x):
    lo, hi = model.support
    flat = x.detach().reshape(x.shape[0], -1)
    return (flat >= lo).all(1) & (flat <= hi).all(1)


def anomaly_scores(model, x: Tensor, batch_size: int = 256, scores=None,
                   nodes: int | None = None) -> dict:
    """Per-sample anomaly scores of x (the model's input shape, in its space), **higher = more
    anomalous** → ``{name: (B,) float64 CPU tensor}``:

    * ``"nll"`` — ``−log q(x)`` in nats (``model.log_prob``), only for a model with a support
      (left out otherwise). A sample with any value outside the support has zero density: it
      gets ``+inf`` (ranked most anomalous), with a warning saying how many did.
    * ``"csm"`` — the per-sample CSM loss ``Σ_d ½(∂E_d/∂x_d)² − ∂²E_d/∂x_d²``
      (``model.loss(x, reduction="none", objective="csm")``; no normaliser).
    * ``"score_norm"`` — ``‖s(x)‖₂`` of the per-dimension conditional scores (``model.score``).

    ``scores``: the names to compute (default: all the model supports). Chunked by
    ``batch_size``; the model's train/eval mode is left as it is (call ``model.eval()``).
    """
    _check_batch_size(batch_size)
    _check_input(model, x, "x")
    has_support = getattr(model, "support", None) is not None
    if scores is None:
        scores = [s for s in SCORES if s != "nll" or has_support]
    else:
        scores = [scores] if isinstance(scores, str) else list(scores)
        bad = [s for s in scores if s not in SCORES]
        if bad:
            raise ValueError(f"scores must be names from {SCORES}; got {bad}")
        if "nll" in scores and not has_support:
            raise ValueError("the 'nll' score needs a normalised model: set model.support = "
                             "(lo, hi), or leave 'nll' out")
    needs = {"nll": "log_prob", "csm": "loss", "score_norm": "score"}
    for s in scores:
        _require_method(model, needs[s], f"the {s!r} anomaly score")
    parts = {s: [] for s in scores}
    outside = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach()
            if "nll" in scores:
                nll = torch.full((xb.shape[0],), math.inf, dtype=torch.float64)
                ok = _in_support_rows(model, xb).cpu()
                outside += int((~ok).sum())
                if ok.any():
                    lp = model.log_prob(xb[ok.to(xb.device)]) if nodes is None else \
                        model.log_prob(xb[ok.to(xb.device)], nodes)
                    nll[ok] = -lp.double().cpu()
                parts["nll"].append(nll)
            if "csm" in scores:
                parts["csm"].append(model.loss(xb, reduction="none", objective="csm")
                                    .double().cpu().reshape(-1))
            if "score_norm" in scores:
                s = model.score(xb)
                parts["score_norm"].append(s.double().reshape(xb.shape[0], -1).norm(dim=1).cpu())
    if outside:
        lo, hi = model.support
        warnings.warn(f"anomaly_scores: {outside} of {x.shape[0]} samples have values outside the "
                      f"model's support [{lo:g}, {hi:g}] (zero density): their 'nll' is +inf",
                      stacklevel=2)
    return {s: (torch.cat(v) if v else torch.empty(0, dtype=torch.float64))
            for s, v in parts.items()}


def _as_score_array(s, name):
    a = np.asarray(s.detach().cpu().double().numpy() if torch.is_tensor(s) else s,
                   dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN scores")
    return a


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve of telling ``scores_out`` (anomalies, the positives) from
    ``scores_in`` (in-distribution) by thresholding the score, higher = more anomalous
    (scikit-learn's ``roc_auc_score``): 1 separates perfectly, 0.5 is chance, below 0.5 the
    score ranks the anomalies as *more* normal. ``±inf`` scores are allowed (ties among
    themselves, beyond every finite score); NaN is an error. Needs scikit-learn (the optional
    ``data`` dependency)."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        raise ModuleNotFoundError("auroc needs the optional package 'scikit-learn' (the 'data' "
                                  "extra), which is not installed; install it with: "
                                  "pip install scikit-learn", name="sklearn") from None
    a, b = _as_score_array(scores_in, "scores_in"), _as_score_array(scores_out, "scores_out")
    s = np.concatenate([a, b])
    finite = s[np.isfinite(s)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = float(finite.min()) if finite.size else 0.0
    span = max(1.0, top - bottom)
    s = np.where(s == np.inf, top + span, np.where(s == -np.inf, bottom - span, s))
    labels = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    return float(roc_auc_score(labels, s))


# ---------------------------------------------------------------- image data helpers


def heldout_images(source):
    """The held-out split of an image source as integer pixels (an
    :class:`~csm_ext.data.ImageData`, the same images as ``source.test``, before
    preprocessing), rebuilt from ``source.config()`` (cached per process: do not modify it)."""
    if getattr(source, "kind", None) != "image":
        raise ValueError(f"needs an image data source; got {getattr(source, 'kind', source)!r}")
    cfg = source.config()
    return _heldout_split(cfg["name"], cfg.get("root"), cfg["test_fraction"], cfg["seed"])


@functools.lru_cache(maxsize=4)
def _heldout_split(name, root, test_fraction, seed):
    # Cached: reading MNIST 5k's CSV takes about a second (the result is only ever indexed).
    from .data.images import load_images

    return load_images(name, root).split(test_fraction, seed)[1]


def noisy_pairs(source, pixels: Tensor, sigma: float, generator=None):
    """``(x, y)`` flat (n, D) in the source's model space: ``x`` the dequantised, rescaled clean
    images (no smoothing noise) and ``y = x + σε`` with ε a standard normal truncated at ±4
    (the noise process the source's data are smoothed with). With σ equal to the source's
    smoothing noise, y is distributed as the model's training data and lies in its support."""
    from .data.images import NOISE_TRUNCATION, truncated_normal

    x = source.pre(pixels, generator=generator, noise=False).flatten(1)
    y = x + float(sigma) * truncated_normal(x.shape, NOISE_TRUNCATION, generator)
    return x, y


def _to_shape(pixels: Tensor, levels: int, shape, target_levels: int) -> Tensor:
    """Integer images (n, C, H, W) in [0, levels) → uint8 images of ``shape`` (C', H', W') in
    [0, target_levels): channels averaged (luminance) or repeated, bilinear resize with
    antialiasing, grey levels rescaled."""
    C, H, W = shape
    v = pixels.float() / (levels - 1)
    if v.shape[1] != C:
        if v.shape[1] == 3 and C == 1:
            v = (v * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif v.shape[1] == 1:
            v = v.expand(-1, C, -1, -1)
        else:
            raise ValueError(f"cannot map {v.shape[1]}-channel images to {C} channels")
    if tuple(v.shape[2:]) != (H, W):
        v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False,
                          antialias=v.shape[2] > H or v.shape[3] > W)
    return (v.clamp(0, 1) * (target_levels - 1)).round().to(torch.uint8)


def load_ood_dir(path: str, shape, levels: int = 256):
    """An image folder as integer pixels of ``shape`` → ``(name, uint8 (n, C, H, W))``: CIFAR-10
    pickle batches (``test_batch``, else the training batches) or MNIST-format IDX files
    (``t10k-images-idx3-ubyte[.gz]``, else any ``*images-idx3-ubyte[.gz]``), loaded with
    :mod:`csm_ext.data.images` and mapped to the shape (greyscale, resize, grey levels)."""
    from .data.images import load_cifar10, load_idx

    if not os.path.isdir(path):
        raise FileNotFoundError(f"OOD data directory not found: {path}")
    name = os.path.basename(os.path.normpath(path)) or path
    root = os.path.join(path, "cifar-10-batches-py")
    root = root if os.path.isdir(root) else path
    if os.path.isfile(os.path.join(root, "test_batch")):
        data = load_cifar10(path, train=False)
    elif glob.glob(os.path.join(glob.escape(root), "data_batch_*")):
        data = load_cifar10(path, train=True)
    else:
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*images-idx3-ubyte*")))
        found.sort(key=lambda p: (not os.path.basename(p).startswith("t10k"), p))
        if not found:
            raise FileNotFoundError(f"{path} holds neither CIFAR-10 pickle batches (test_batch, "
                                    "data_batch_N) nor IDX images (*images-idx3-ubyte[.gz])")
        data = load_idx(found[0], name=name)
    return name, _to_shape(data.images, data.levels, shape, levels)


def ood_sets(source, n: int, seed: int = 0, dirs=(), sets=OOD_SETS) -> dict:
    """Out-of-distribution image sets for an image source, as integer pixels of its shape and
    grey levels → ``{name: uint8 (n, C, H, W)}`` (pass each through :func:`to_model_space`):

    * ``uniform`` — every pixel uniform over the grey levels;
    * ``gaussian`` — every pixel ``N(mid-grey, (levels/4)²)``, rounded and clipped;
    * ``permuted`` — held-out images with one fixed random permutation of the pixel positions;
    * ``inverted`` — held-out images, ``levels − 1 − v``;
    * ``constant`` — one grey level per image, uniform over the levels;
    * ``digits8x8`` — scikit-learn's 8×8 digits resized (bilinear) to the source's size;
    * one set per folder in ``dirs`` (:func:`load_ood_dir`), named after the folder.

    Seeded by ``seed``; each set has ``min(n, available)`` images."""
    from .data.images import load_digits8

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    bad = [s for s in sets if s not in OOD_SETS]
    if bad:
        raise ValueError(f"sets must be names from {OOD_SETS}; got {bad}")
    shape, L = tuple(source.shape), int(source.pre.levels)
    C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    held = heldout_images(source).images
    held = held[torch.randperm(len(held), generator=g)[:n]]
    m = held.shape[0]
    out = {}
    for s in sets:
        if s == "uniform":
            out[s] = torch.randint(0, L, (n, *shape), generator=g).to(torch.uint8)
        elif s == "gaussian":
            v = (L - 1) / 2 + L / 4 * torch.randn((n, *shape), generator=g)
            out[s] = v.round().clamp(0, L - 1).to(torch.uint8)
        elif s == "permuted":
            perm = torch.randperm(H * W, generator=g)
            out[s] = held.reshape(m, C, H * W)[:, :, perm].reshape(m, *shape).clone()
        elif s == "inverted":
            out[s] = (L - 1 - held.long()).to(torch.uint8)
        elif s == "constant":
            c = torch.randint(0, L, (n, 1, 1, 1), generator=g)
            out[s] = c.expand(n, *shape).to(torch.uint8).clone()
        elif s == "digits8x8":
            d = load_digits8()
            idx = torch.randperm(len(d), generator=g)[:n]
            out[s] = _to_shape(d.images[idx], d.levels, shape, L)
    for path in dirs:
        name, pix = load_ood_dir(path, shape, L)
        key = f"dir:{name}"
        out[key] = pix[torch.randperm(len(pix), generator=g)[:n]]
    return out


def to_model_space(source, pixels: Tensor, generator=None) -> Tensor:
    """Integer pixels → flat (n, D) model-space data through the source's own preprocessing
    (dequantisation, affine map, smoothing noise σ truncated at ±4σ): inside its support."""
    return source.pre(pixels, generator=generator).flatten(1)


# ---------------------------------------------------------------- evaluations


def _clamp_inside(y, lo, hi):
    """Clamp y into [lo, hi] with bounds rounded *inward* to y's dtype (float32(−3.4) < −3.4)."""
    lo_t, hi_t = torch.tensor(lo, dtype=y.dtype), torch.tensor(hi, dtype=y.dtype)
    if float(lo_t) < lo:
        lo_t = torch.nextafter(lo_t, hi_t)
    if float(hi_t) > hi:
        hi_t = torch.nextafter(hi_t, lo_t)
    return y.clamp(float(lo_t), float(hi_t))


def _model_device(model):
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def save_rows_figure(rows, path, title=None):
    """A PNG of image rows with a label each: ``rows`` = ``[(label, images (n, C, H, W) in
    [0, 1]), ...]``, the same n in every row (e.g. clean / noisy / each denoiser)."""
    from . import plots  # noqa: F401  (selects matplotlib's Agg backend)
    import matplotlib.pyplot as plt

    n = max(int(r[1].shape[0]) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.0 * n + 1.6, 1.0 * len(rows) + 0.5),
                             squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        imgs = imgs.detach().float().cpu().clamp(0, 1)
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < imgs.shape[0]:
                im = imgs[j]
                if im.shape[0] == 1:
                    ax.imshow(im[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=1.5 / (1.0 * n + 1.6), right=0.99, top=0.9 if title else 0.98,
                        bottom=0.02, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_denoising(model, source, sigma: float, n: int = 100, seed: int = 0,
                       methods=DENOISERS, batch_size: int = 64, clamp_to_support: bool = False,
                       pixels: Tensor | None = None) -> dict:
    """Denoise ``n`` held-out images of an image source (or ``pixels``) at noise σ with each
    method → ``dict(clean=, noisy=, outputs={method: x̂}, psnr={...}, mse={...},
    psnr_clipped={...}, seconds={...}, clamped=)``; PSNR in dB on the model scale (peak-to-peak
    the data range; images in [-1, 1]: 2), the mean over images; ``psnr_clipped``: after
    clipping x̂ to the data range. ``clamp_to_support``: clamp y into the model's support first
    (only needed when σ exceeds the noise the model was trained with; ``clamped`` counts the
    values moved)."""
    import time

    if pixels is None:
        pixels = heldout_images(source).images[:n]
    g = torch.Generator().manual_seed(seed)
    x, y = noisy_pairs(source, pixels[:n], sigma, g)
    clamped = 0
    if clamp_to_support and getattr(model, "support", None) is not None:
        lo, hi = model.support
        clamped = int(((y < lo) | (y > hi)).sum())
        y = _clamp_inside(y, lo, hi)
    lo, hi = source.clip
    peak = hi - lo
    res = dict(clean=x, noisy=y, outputs={}, psnr={}, mse={}, psnr_clipped={}, seconds={},
               clamped=clamped, peak=peak, n=int(x.shape[0]), sigma=float(sigma))
    res["psnr"]["noisy"] = float(psnr(y, x, peak).mean())
    res["mse"]["noisy"] = float((y - x).double().pow(2).mean())
    res["psnr_clipped"]["noisy"] = float(psnr(y.clamp(lo, hi), x, peak).mean())
    dev = _model_device(model)
    for m in methods:
        t0 = time.perf_counter()
        xh = denoise(model, y.to(dev), sigma, m, batch_size).cpu()
        res["seconds"][m] = time.perf_counter() - t0
        res["outputs"][m] = xh
        res["psnr"][m] = float(psnr(xh, x, peak).mean())
        res["mse"][m] = float((xh - x).double().pow(2).mean())
        res["psnr_clipped"][m] = float(psnr(xh.clamp(lo, hi), x, peak).mean())
    return res


def likelihood_failures(table: dict, score: str = "nll") -> list:
    """The OOD sets whose ``score`` AUROC is below 0.5 in an :func:`evaluate_anomaly` table: the
    model finds them *more* likely than its own held-out data (the known failure mode of
    likelihood scores: simple, smooth images look likely)."""
    return sorted(k for k, row in table.items() if row.get(score) is not None and row[score] < 0.5)


def evaluate_anomaly(model, source, n: int = 500, seed: int = 0, dirs=(), sets=OOD_SETS,
                     batch_size: int = 100, nodes: int | None = None,
                     keep_scores: bool = False) -> dict:
    """AUROC of each anomaly score for held-out data (``source.test[:n]``, the model's own
    preprocessing and noise) against each OOD set of :func:`ood_sets` (the same preprocessing)
    → ``dict(table={set: {score: auroc}}, mean={score: ...}, n_in=, n_out={set: n},
    score_means={set: {score: mean}}, likelihood_failures=[...], seconds=)``; with
    ``keep_scores`` also ``raw={"in-distribution" or set: {score: (n,) tensor}}`` and
    ``pixels={set: uint8 images}``."""
    import time

    t0 = time.perf_counter()
    dev = _model_device(model)
    x_in = source.test[:n]
    g = torch.Generator().manual_seed(seed + 17)
    s_in = anomaly_scores(model, x_in.to(dev), batch_size, nodes=nodes)
    pix = ood_sets(source, n, seed, dirs, sets)
    table, n_out, means = {}, {}, {"in-distribution": {k: float(v.mean()) for k, v in s_in.items()}}
    raw = {"in-distribution": s_in}
    for name, p in pix.items():
        s_out = anomaly_scores(model, to_model_space(source, p, g).to(dev), batch_size,
                               nodes=nodes)
        raw[name] = s_out
        table[name] = {k: auroc(s_in[k], s_out[k]) for k in s_in}
        n_out[name] = int(p.shape[0])
        means[name] = {k: float(v.mean()) for k, v in s_out.items()}
    mean = {k: float(np.mean([row[k] for row in table.values()])) if table else math.nan
            for k in s_in}
    res = dict(table=table, mean=mean, n_in=int(x_in.shape[0]), n_out=n_out,
               score_means=means, scores=list(s_in),
               likelihood_failures=likelihood_failures(table) if "nll" in s_in else [],
               seconds=time.perf_counter() - t0)
    if keep_scores:
        res.update(raw=raw, pixels=pix)
    return res
