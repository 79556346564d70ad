"""Maximum-likelihood baselines on the same context networks: normalised mixture conditionals.

The energy models (:class:`~csm_ext.models.ARCSM`) turn a context ``c_d`` into an unnormalised
conditional ``exp(−E(c_d, x_d))``. The baselines here turn the same context network's outputs
into the parameters of a closed-form density and train by maximum likelihood:

* :class:`MADEMixture` — the MADE of :class:`~csm_ext.models.MADECSM` (the shared
  :class:`~csm_ext.models.made.MADENet` mixin, not a copy) with 3K outputs per dimension: a
  mixture of K Gaussians per conditional (K = 1: MADE-Gaussian);
* :class:`PixelCNNppMixture` — the PixelCNN++ backbone and the within-pixel channel context of
  :class:`~csm_ext.models.PixelCNNppCSM` (imported, not copied) with 3K outputs per sub-pixel:
  a continuous mixture of K logistics, the PixelCNN++ output density in the smoothed space.

**Support.** Like the energy models, every conditional is a proper density on the model's
support ``[lo, hi]`` (images: the data range widened by 4σ of the truncated smoothing noise;
toys: the widened box): each mixture component is truncated to the support and renormalised
exactly by its CDF difference,

    q(x_d | x_<d) = Σ_k π_k f_k(x_d) / (F_k(hi) − F_k(lo))   on [lo, hi],

so the likelihoods of both families are densities on the same interval and their bits/dim
compare directly. (Without a support the components are the untruncated densities on ℝ.)

Per element the outputs are ``[logits (K), means (K), log-scales (K)]``; log-scales are
clamped below at ``min_log_scale`` (−7, as in PixelCNN++).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import ARModel
from .made import MADENet
from .pixelcnnpp import Nin, PixelCNNppBackbone, PixelCNNppCSM

__all__ = ["MixtureAR", "MADEMixture", "PixelCNNppMixture", "FAMILIES", "mixture_log_prob",
           "mixture_sample"]

FAMILIES = ("gaussian", "logistic")
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- 1-D mixture math


def _log_cdf(z: Tensor, family: str) -> Tensor:
    return torch.special.log_ndtr(z) if family == "gaussian" else F.logsigmoid(z)


def _log_pdf(z: Tensor, family: str) -> Tensor:
    """Log-density of the standardised variable z (before the −log s of the scale)."""
    if family == "gaussian":
        return -0.5 * z * z - 0.5 * LOG_2PI
    return -z - 2 * F.softplus(-z)


def _log_diff(la: Tensor, lb: Tensor) -> Tensor:
    """log(e^la − e^lb) for la ≥ lb, accurate both when lb ≪ la and when lb ≈ la."""
    d = (lb - la).clamp(max=-1e-30)
    return la + torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)),
                            torch.log1p(-torch.exp(d)))


def _log_mass(a: Tensor, b: Tensor, family: str) -> Tensor:
    """log(F(b) − F(a)) for a < b of a symmetric standard distribution, computed on the side of
    the lighter tails (F(b) − F(a) = F(−a) − F(−b)) so far-away intervals keep their digits."""
    upper = (a + b) > 0
    hi = torch.where(upper, -a, b)
    lo = torch.where(upper, -b, a)
    return _log_diff(_log_cdf(hi, family), _log_cdf(lo, family))


def _split(params: Tensor, min_log_scale: float):
    logits, mu, log_s = params.chunk(3, dim=-1)
    return logits, mu, log_s.clamp(min=min_log_scale)


def mixture_log_prob(params: Tensor, x: Tensor, family: str, support=None,
                     min_log_scale: float = -7.0) -> Tensor:
    """Log-density of each element of x under its mixture.

    Args:
        params: (..., 3K) per element: K logits, K means, K log-scales.
        x: (...) the values, same leading shape.
        family: ``"gaussian"`` or ``"logistic"``.
        support: ``(lo, hi)``: every component truncated to it and renormalised by its exact
            CDF difference (None: densities on ℝ).
    Returns (...) in nats.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    logits, mu, log_s = _split(params, min_log_scale)
    inv_s = torch.exp(-log_s)
    z = (x.unsqueeze(-1) - mu) * inv_s
    lp = _log_pdf(z, family) - log_s
    if support is not None:
        lo, hi = support
        lp = lp - _log_mass((lo - mu) * inv_s, (hi - mu) * inv_s, family)
    return torch.logsumexp(F.log_softmax(logits, -1) + lp, -1)


def _inverse_cdf(p: Tensor, family: str) -> Tensor:
    return torch.special.ndtri(p) if family == "gaussian" else torch.logit(p)


def _cdf(z: Tensor, family: str) -> Tensor:
    return torch.special.ndtr(z) if family == "gaussian" else torch.sigmoid(z)


def mixture_sample(params: Tensor, family: str, support=None, generator=None,
                   min_log_scale: float = -7.0) -> Tensor:
    """One exact draw per row of params (n, 3K): a component from the softmax of the logits,
    then a value by the inverse CDF of that component (truncated to ``support`` when given).
    Returns (n,). Computed in float64 and clamped into the support."""
    logits, mu, log_s = (t.double() for t in _split(params, min_log_scale))
    n = params.shape[0]
    k = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (n, 1)
    mu, s = mu.gather(1, k)[:, 0], log_s.gather(1, k)[:, 0].exp()
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=params.device)
    u = u.clamp(1e-12, 1 - 1e-12)
    if support is None:
        x = mu + s * _inverse_cdf(u, family)
    else:
        lo, hi = support
        a, b = (lo - mu) / s, (hi - mu) / s
        # Work on the side of the lighter tail (mirror when the interval lies above the mean).
        up = (a + b) > 0
        aa, bb = torch.where(up, -b, a), torch.where(up, -a, b)
        fa, fb = _cdf(aa, family), _cdf(bb, family)
        z = _inverse_cdf((fa + u * (fb - fa)).clamp(1e-300, 1 - 1e-16), family)
        z = torch.where(up, -z, z)
        x = (mu + s * z).nan_to_num(0.5 * (lo + hi)).clamp(lo, hi)
    return x.to(params.dtype)


# ---------------------------------------------------------------- the base class


class MixtureAR(ARModel):
    """Autoregressive model whose conditionals are closed-form mixtures (``family``), trained by
    maximum likelihood. A subclass provides ``params(x) -> (B, D, 3K)`` (element d's parameters
    depend on x_<d only), ``_sweep(x, progress)`` yielding ``(d, params_d (B, 3K))`` in the
    order for sampling, ``order``, ``dim``, ``components`` and ``config``."""

    family: str = "gaussian"
    components: int

    OBJECTIVES = ("mle",)
    SAMPLERS = ("ancestral",)

    @property
    def objective(self) -> str:
        """Always ``"mle"``: the baselines are trained by their exact negative log-likelihood."""
        return "mle"

    @objective.setter
    def objective(self, value: str) -> None:
        if value != "mle":
            raise ValueError(f"objective of {type(self).__name__} must be 'mle' (its likelihood "
                             f"is closed-form); got {value!r}")

    def _param_tensor(self) -> Tensor:
        return next(self.parameters())

    def log_prob_elements(self, x: Tensor) -> Tensor:
        """Log-density (nats) of every element's conditional, ``log q(x_d | x_<d)``, (B, D)
        for x in the model's input shape (flat (B, D) for images too)."""
        xf = self._flatten(x)
        if self.support is not None:
            self._check_in_support(xf)
        return mixture_log_prob(self.params(xf), xf, self.family, self.support,
                                self.config["min_log_scale"])

    def log_prob(self, x: Tensor, nodes: int | None = None) -> Tensor:
        """Normalised log-density (nats) of each sample, (B,): ``Σ_d log q(x_d | x_<d)``, exact
        (closed-form CDF normalisation on the support; data outside it raise). ``nodes`` is
        accepted for the energy models' interface and has no effect (no quadrature here)."""
        return self.log_prob_elements(x).sum(1)

    def loss(self, x: Tensor, reduction: str = "mean", objective: str | None = None,
             nodes: int | None = None) -> Tensor:
        """The negative log-likelihood per sample (nats), reduced by ``reduction`` (``"mean"``,
        ``"sum"``, ``"none"`` → (B,)). ``objective`` may only be ``"mle"`` (or None)."""
        if objective not in (None, "mle"):
            raise ValueError(f"objective of {type(self).__name__} must be 'mle'; "
                             f"got {objective!r}")
        return self._reduce(-self.log_prob(x), reduction)

    def forward(self, x: Tensor, reduction: str = "mean") -> Tensor:
        """Same as :meth:`loss` (so DistributedDataParallel can wrap the model)."""
        return self.loss(x, reduction)

    @torch.no_grad()
    def quadrature_error(self, x: Tensor, nodes: int | None = None) -> dict:
        """The energy models' accuracy report, for a common interface: the mixtures are
        normalised in closed form, so every error is 0 (``nodes`` None: no quadrature)."""
        return dict(nodes=None, max_abs=0.0, mean_abs=0.0, max_per_sample=0.0)

    def score(self, x: Tensor) -> Tensor:
        """Per-element conditional scores ``s_d = ∂/∂x_d log q(x_d | x_<d)`` (the parameters
        held fixed at their values for x_<d) with the shape of x."""
        with torch.enable_grad():
            xf = self._flatten(x).detach()
            prm = self.params(xf).detach()
            xg = xf.clone().requires_grad_(True)
            lp = mixture_log_prob(prm, xg, self.family, None, self.config["min_log_scale"])
            (g,) = torch.autograd.grad(lp.sum(), xg)
        return self._unflatten(g, "flat" if x.dim() == 2 else "image")

    @torch.no_grad()
    def sample(self, n: int, method: str | None = None, clip=None, denoise: float = 0.0,
               temperature: float = 1.0, progress: bool = True,
               generator: torch.Generator | None = None, device=None, **sampler_settings
               ) -> Tensor:
        """Draw n samples by exact ancestral sampling, dimension by dimension in the order
        (component, then inverse CDF of the truncated component). Returns (n, D) (subclasses:
        their native shape).

        ``method``: None or ``"ancestral"``; ``"grid"`` (the energy models' exact sampler, the
        command line's default) is taken to mean this exact sampler; ``"langevin"`` raises.
        ``denoise=σ`` ends with the per-dimension Tweedie step ``x ← x + σ²·s(x)`` and
        ``clip=(lo, hi)`` clamps the result, as for the energy models. ``temperature`` must be
        1 (a tempered mixture is no mixture). The energy samplers' other settings
        (``nodes``, ``steps``, ``step_size``, ``anneal``, ``init``) are accepted, so a run's
        stored sampling settings apply to either family, and have no effect.
        """
        if method not in (None, "ancestral", "grid"):
            raise ValueError(f"method of {type(self).__name__} must be 'ancestral' (exact); "
                             f"got {method!r}")
        unknown = set(sampler_settings) - {"nodes", "steps", "step_size", "anneal", "init"}
        if unknown:
            raise TypeError(f"sample() got unexpected arguments {sorted(unknown)}")
        if temperature != 1.0:
            raise ValueError(f"temperature must be 1 for {type(self).__name__} (a tempered "
                             f"mixture is not a mixture); got {temperature}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int; got {n!r}")
        p = self._param_tensor()
        device = p.device if device is None else device
        x = torch.zeros(n, self.dim, dtype=p.dtype, device=device)
        if n > 0:
            for d, prm in self._sweep(x, progress):
                x[:, d] = mixture_sample(prm, self.family, self.support, generator,
                                         self.config["min_log_scale"])
        if denoise:
            x = x + denoise ** 2 * self._flatten(self.score(self._unflatten(x)))
        if clip is not None:
            x = x.clamp(*clip)
        return self._unflatten(x)


def _check_components(components):
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive int; got {components!r}")


# ---------------------------------------------------------------- MADE


class MADEMixture(MADENet, MixtureAR):
    """MADE with a mixture of K Gaussians per conditional, trained by maximum likelihood
    (``components=1``: MADE-Gaussian).

    Args:
        dim: D (inputs flat, (B, D)).
        hidden_sizes, order, direct, seed: the MADE, exactly as in
            :class:`~csm_ext.models.MADECSM` (the same :class:`MADENet` code).
        components: K, mixture components per dimension (3K MADE outputs per dimension).
        support: ``(lo, hi)``: the components are truncated to it and renormalised exactly
            (see the module docstring); None: densities on ℝ.
        min_log_scale: lower clamp of the log-scales.
    """

    family = "gaussian"

    def __init__(self, dim, hidden_sizes=(512,), components=1, order=None, direct=False,
                 seed=0, support=None, min_log_scale=-7.0):
        super().__init__()
        _check_components(components)
        self.dim, self.components = dim, components
        order, hidden_sizes = self._build_made(dim, hidden_sizes, 3 * components, order,
                                               direct, seed)
        self.config = dict(dim=dim, hidden_sizes=list(hidden_sizes), components=components,
                           order=order.tolist(), direct=bool(direct), seed=seed,
                           min_log_scale=float(min_log_scale))
        self.support = support

    def params(self, x: Tensor) -> Tensor:
        """Mixture parameters (B, D, 3K) of flat x (B, D); row d depends on x_<d only."""
        return self._made_outputs(self._flatten(x))

    def _sweep(self, x, progress=False):
        return self._made_sweep(x, progress)


# ---------------------------------------------------------------- PixelCNN++


class PixelCNNppMixture(MixtureAR):
    """PixelCNN++ with a continuous mixture of K logistics per sub-pixel, truncated to the
    support (the PixelCNN++ output density, in the same smoothed space as PixelCNN++-CSM).

    The network is :class:`~csm_ext.models.pixelcnnpp.PixelCNNppBackbone` followed by the same
    1×1 output layer and within-pixel channel context as :class:`PixelCNNppCSM` (whose context
    methods it uses, with 3K outputs per sub-pixel in place of the K context features): the
    parameters of channel c at pixel (i, j) see the pixels before (i, j) and channels < c of
    (i, j) (linearly, as PixelCNN++'s mean coefficients; here every parameter may depend on
    them).

    Args:
        channels, height, width: the image shape (C, H, W).
        nr_resnet, nr_filters, dropout: the backbone (as :class:`PixelCNNppCSM`).
        components: K logistics per sub-pixel (PixelCNN++: 10).
        support, min_log_scale: see :class:`MADEMixture`.
    Inputs (B, C, H, W) or flat (B, C·H·W), as for :class:`PixelCNNppCSM`.
    """

    family = "logistic"

    def __init__(self, channels: int, height: int, width: int, nr_resnet: int = 5,
                 nr_filters: int = 160, components: int = 10, dropout: float = 0.0,
                 support=None, min_log_scale: float = -7.0):
        super().__init__()
        for name, v in (("channels", channels), ("height", height), ("width", width),
                        ("nr_resnet", nr_resnet), ("nr_filters", nr_filters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        _check_components(components)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        C, H, W, P = channels, height, width, 3 * components
        self.channels, self.height, self.width, self.components = C, H, W, components
        self.context_dim = P  # the context code of PixelCNNppCSM calls its per-element width K
        self.dim = C * H * W
        self.backbone = PixelCNNppBackbone(C, nr_resnet, nr_filters, dropout)
        self.out = Nin(nr_filters, C * P)
        if C > 1:  # within-pixel channel mask, as PixelCNNppCSM's: unit (c, k) sees c' < c
            self.chan_weight = nn.Parameter(torch.empty(C * P, C))
            nn.init.uniform_(self.chan_weight, -1.0 / math.sqrt(C), 1.0 / math.sqrt(C))
            mask = torch.arange(C)[None, :] < torch.arange(C)[:, None]
            self.register_buffer("chan_mask", mask.repeat_interleave(P, 0).float(),
                                 persistent=False)
        else:
            self.chan_weight = None
        idx = torch.arange(self.dim).view(C, H, W)
        self.register_buffer("order", idx.permute(1, 2, 0).reshape(-1))
        self.config = dict(channels=C, height=H, width=W, nr_resnet=nr_resnet,
                           nr_filters=nr_filters, components=components, dropout=float(dropout),
                           min_log_scale=float(min_log_scale))
        self.support = support

    # The PixelCNN++ context machinery, shared with PixelCNNppCSM (the same functions).
    shape = PixelCNNppCSM.shape
    _as_image = PixelCNNppCSM._as_image
    _flatten = PixelCNNppCSM._flatten
    _unflatten = PixelCNNppCSM._unflatten
    features = PixelCNNppCSM.features
    _channel_part = PixelCNNppCSM._channel_part
    _pixel_features = PixelCNNppCSM._pixel_features
    _pixel_channel_context = PixelCNNppCSM._pixel_channel_context
    _sweep = PixelCNNppCSM._sweep

    def params(self, x: Tensor) -> Tensor:
        """Logistic-mixture parameters: (B, D, 3K) for flat x (B, D), (B, C, H, W, 3K) for
        images; element (c, i, j) depends only on the elements before it in the order."""
        return PixelCNNppCSM.context(self, x)

    def log_prob_elements(self, x: Tensor) -> Tensor:
        """``log q(x_cij | x_<cij)`` (B, D), flat C-major, for images or flat x."""
        return super().log_prob_elements(self._flatten(x))

    def score(self, x: Tensor) -> Tensor:
        img, flat = self._as_image(x)
        g = super().score(img.reshape(img.shape[0], self.dim))
        return g if flat else g.view(img.shape)

    @torch.no_grad()
    def sample(self, n: int, method: str | None = None, flat: bool = False, **kwargs) -> Tensor:
        """Samples (n, C, H, W) (``flat=True``: (n, C·H·W)) by exact ancestral sampling, the
        backbone run once per pixel on the rows so far; the arguments of
        :meth:`MixtureAR.sample`. Runs in eval mode (no dropout) and restores the mode."""
        was_training = self.training
        self.eval()
        try:
            x = super().sample(n, method, **kwargs)
        finally:
            self.train(was_training)
        return x.reshape(n, self.dim) if flat else x
