"""VAEs with an implicit encoder, trained through a conditional AR-CSM (and the baselines).

A VAE maximises the ELBO ``E_q[log p(x|z) + log p(z) − log q(z|x)]``. An *implicit* encoder
``z = f(x, ε)`` (ε ~ N(0, I) fed at its input, no density) makes the entropy term
``−E_q log q(z|x)`` intractable, but its gradient needs only the score: with the
reparameterisation, ``∇_φ H = −E_ε[∇_z log q(z|x)·∂z/∂φ]`` (the ``E_q[∇_φ log q]`` term is zero),
so the surrogate ``Σ_d stopgrad(∇_z log q(z|x))_d · z_d`` has the entropy gradient's negative as
its gradient. Three methods on the same encoder/decoder networks (:data:`METHODS`):

* ``"elbo-gaussian"`` — a Gaussian encoder, reparameterised, analytic entropy (the baseline);
* ``"ssm-implicit"`` — the implicit encoder with a score network ``s(z, x)`` (an MLP) fitted by
  sliced score matching (variance-reduced, Gaussian projections) to fresh encoder samples
  (Song et al., UAI 2019);
* ``"csm-implicit"`` — the implicit encoder with a **conditional AR-CSM** ``q(z|x)``
  (:class:`~csm_ext.models.MADECSM` with ``cond_dim = 784``) fitted by CSM to fresh encoder
  samples; ``∇_z log q(z|x)`` is its exact joint score (one backward pass through the
  normalised model, :meth:`~csm_ext.models.ARCSM.log_prob`), so it also gives an ELBO estimate.

Training (:func:`train_vae`) alternates, every step: ``fit_steps`` updates of the score
estimator on fresh encoder samples of the batch, then one update of encoder and decoder.

The latent support of the AR-CSM is the fixed box :data:`LATENT_SUPPORT` (the N(0, 1) prior's
scale: P(|z| > 8) = 1.2e-15 under the prior), with :data:`LATENT_NODES` Simpson nodes (spacing
0.0625; the runs report the G vs 2G−1 error on test-set encoder samples) and the
head's confinement ``0.1·z²/2`` (a weak Gaussian tail, so exp(−E) decays away from where the
head was fitted; a confinement as strong as the prior's ``½z²`` cancels the prior's pull in the
entropy gradient far from the data, and training drifted). Encoder samples outside the box raise (nothing is clamped); the implicit
encoders of :func:`train_vae` bound their output smoothly, ``7.5·tanh(f/7.5)``
(:data:`IMPLICIT_BOUND`, identical in both implicit methods), so their samples lie inside by
construction.

Evaluation (:func:`vae_nll`): the decoder's test negative log-likelihood by importance sampling
with K samples from a proposal fitted per test image (:func:`fit_proposal`: a full-covariance
Gaussian fitted to M encoder samples, covariance inflated, mixed with the prior as a defensive
component), :func:`importance_log_likelihood`. Data: binarised MNIST (:func:`binarized_mnist`),
dynamically binarised for training, binarised once (seeded) for the test set.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .models import MADECSM

__all__ = ["METHODS", "LATENT_SUPPORT", "LATENT_NODES", "MLP", "GaussianEncoder",
           "ImplicitEncoder", "BernoulliDecoder", "ScoreNet", "conditional_arcsm",
           "sliced_score_loss", "entropy_surrogate", "log_prior", "VAEConfig", "train_vae",
           "fit_proposal", "importance_log_likelihood", "vae_nll", "binarized_mnist",
           "check_latent_support", "IMPLICIT_BOUND", "csm_score", "build_models"]

METHODS = ("elbo-gaussian", "ssm-implicit", "csm-implicit")
LATENT_SUPPORT = (-8.0, 8.0)
LATENT_NODES = 257
# The implicit encoders' output bound (ImplicitEncoder(bound=...)), inside LATENT_SUPPORT.
IMPLICIT_BOUND = 7.5
_LOG2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- networks

class MLP(nn.Module):
    """``sizes[0] → … → sizes[-1]``, softplus between layers, none after the last."""

    def __init__(self, sizes):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must be >= 2 positive widths; got {sizes}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.softplus(x)
        return x


def _check_batch(x: Tensor, dim: int, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}); got "
                         f"{tuple(getattr(x, 'shape', ()))}")


class GaussianEncoder(nn.Module):
    """``q(z|x) = N(μ(x), diag(σ(x)²))``: an MLP ``x_dim → hidden… → 2·z_dim``."""

    def __init__(self, x_dim: int = 784, z_dim: int = 8, hidden=(300, 300)):
        super().__init__()
        if z_dim < 1 or x_dim < 1:
            raise ValueError(f"x_dim and z_dim must be >= 1; got {x_dim}, {z_dim}")
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = MLP([x_dim, *hidden, 2 * z_dim])

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``, each (B, z_dim), of x (B, x_dim)."""
        _check_batch(x, self.x_dim)
        mean, log_std = self.net(x).chunk(2, dim=1)
        return mean, log_std.clamp(-9.0, 4.0)

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """A reparameterised sample z (B, z_dim) (``eps`` (B, z_dim) ~ N(0, I), drawn if None)."""
        mean, log_std = self.params(x)
        eps = torch.randn_like(mean) if eps is None else eps
        return mean + log_std.exp() * eps

    def entropy(self, x: Tensor) -> Tensor:
        """Analytic entropy of q(·|x), (B,)."""
        _, log_std = self.params(x)
        return log_std.sum(1) + 0.5 * self.z_dim * (1 + _LOG2PI)


class ImplicitEncoder(nn.Module):
    """``z = f(x, ε)``: an MLP on the concatenation ``[x, ε]``, ε ~ N(0, I_noise_dim). No
    density; only samples.

    ``bound``: None, or b > 0 to make the output ``b·tanh(MLP/b)`` (part of the architecture:
    the identity to within 2.1 % for |z| < b/4, and every sample lies in (−b, b), so inside a
    score model's support by construction instead of by luck)."""

    def __init__(self, x_dim: int = 784, z_dim: int = 8, hidden=(300, 300),
                 noise_dim: int | None = None, bound: float | None = None):
        super().__init__()
        noise_dim = z_dim if noise_dim is None else int(noise_dim)
        if z_dim < 1 or x_dim < 1 or noise_dim < 1:
            raise ValueError(f"x_dim, z_dim and noise_dim must be >= 1; got {x_dim}, {z_dim}, "
                             f"{noise_dim}")
        if bound is not None and not (isinstance(bound, (int, float)) and bound > 0):
            raise ValueError(f"bound must be None or a number > 0; got {bound!r}")
        self.x_dim, self.z_dim, self.noise_dim = x_dim, z_dim, noise_dim
        self.bound = None if bound is None else float(bound)
        self.net = MLP([x_dim + noise_dim, *hidden, z_dim])

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """A sample z (B, z_dim) for x (B, x_dim) (``eps`` (B, noise_dim), drawn if None)."""
        _check_batch(x, self.x_dim)
        if eps is None:
            eps = torch.randn(x.shape[0], self.noise_dim, dtype=x.dtype, device=x.device)
        _check_batch(eps, self.noise_dim, "eps")
        z = self.net(torch.cat([x, eps], 1))
        return z if self.bound is None else self.bound * torch.tanh(z / self.bound)


class BernoulliDecoder(nn.Module):
    """``p(x|z) = Π Bernoulli(x_i; sigmoid(logits_i(z)))``: an MLP ``z_dim → hidden… → x_dim``."""

    def __init__(self, z_dim: int = 8, x_dim: int = 784, hidden=(300, 300)):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = MLP([z_dim, *hidden, x_dim])

    def logits(self, z: Tensor) -> Tensor:
        """(..., x_dim) logits of z (..., z_dim)."""
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"z must have shape (..., {self.z_dim}); got {tuple(z.shape)}")
        return self.net(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z)`` (...,) for binary x broadcastable to (..., x_dim)."""
        logits = self.logits(z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                   reduction="none").sum(-1)


class ScoreNet(nn.Module):
    """The SSM baseline's score model ``s(z, x) ≈ ∇_z log q(z|x)``: an MLP on ``[z, x]``."""

    def __init__(self, z_dim: int = 8, x_dim: int = 784, hidden=(300, 300)):
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.net = MLP([z_dim + x_dim, *hidden, z_dim])

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """(B, z_dim) scores for z (B, z_dim), x (B, x_dim)."""
        _check_batch(z, self.z_dim, "z")
        _check_batch(x, self.x_dim)
        return self.net(torch.cat([z, x], 1))


def conditional_arcsm(z_dim: int, x_dim: int = 784, hidden_sizes=(256,), context_dim: int = 8,
                      head_hidden: int = 32, head_layers: int = 2, confine: float = 0.1,
                      seed: int = 0) -> MADECSM:
    """The conditional AR-CSM ``q(z|x)``: MADE over z with x as an unmasked conditioning
    input, on the latent support :data:`LATENT_SUPPORT`, confinement ``confine·z²/2``."""
    return MADECSM(z_dim, hidden_sizes=hidden_sizes, context_dim=context_dim,
                   head_hidden=head_hidden, head_layers=head_layers, confine=confine,
                   seed=seed, support=LATENT_SUPPORT, cond_dim=x_dim)


# ----------------------------------------------------------------------------- objectives

def log_prior(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` (...,) of z (..., D)."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * _LOG2PI


def sliced_score_loss(score_net, z: Tensor, x: Tensor, n_projections: int = 1) -> Tensor:
    """Variance-reduced sliced score matching of a score *network* (not necessarily a
    gradient): per sample ``½|s|² + vᵀ∇_z(vᵀs)``, v ~ N(0, I), mean over the batch (z (B, D),
    x (B, x_dim)); one extra backward pass per projection."""
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1; got {n_projections}")
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        s = score_net(z, x)
        total = 0.5 * (s * s).sum(1)
        for _ in range(n_projections):
            v = torch.randn_like(z)
            (jv,) = torch.autograd.grad((s * v).sum(), z, create_graph=True)
            total = total + (jv * v).sum(1) / n_projections
    return total.mean()


def check_latent_support(z: Tensor, what: str = "encoder samples") -> None:
    """Raise if any latent lies outside :data:`LATENT_SUPPORT` (the AR-CSM's support)."""
    lo, hi = LATENT_SUPPORT
    zmin, zmax = float(z.detach().min()), float(z.detach().max())
    if not (zmin >= lo and zmax <= hi):
        raise ValueError(f"{what} have values in [{zmin:.3g}, {zmax:.3g}], outside the latent "
                         f"support [{lo:g}, {hi:g}] of the conditional AR-CSM (nothing is "
                         "clamped: widen csm_ext.vae.LATENT_SUPPORT or lower the learning rate)")


def entropy_surrogate(score: Tensor, z: Tensor) -> Tensor:
    """``Σ_d stopgrad(score)_d · z_d`` per sample (B,): its gradient in the encoder's
    parameters is ``−∇_φ H[q(z|x)]`` when ``score = ∇_z log q(z|x)`` at z = f_φ(x, ε)."""
    return (score.detach() * z).sum(1)


def csm_score(model: MADECSM, z: Tensor, x: Tensor, nodes: int = LATENT_NODES
              ) -> tuple[Tensor, Tensor]:
    """``(∇_z log q(z|x), log q(z|x))`` of the conditional AR-CSM, (B, D) and (B,), by one
    backward pass through its normalised log-density (no graph kept)."""
    check_latent_support(z)
    with torch.enable_grad():
        zg = z.detach().requires_grad_(True)
        lp = model.log_prob(zg, nodes, cond=x)
        (g,) = torch.autograd.grad(lp.sum(), zg)
    return g, lp.detach()


# ----------------------------------------------------------------------------- training

class VAEConfig:
    """Settings of one VAE run (all keyword arguments; :meth:`as_dict` for JSON).

    ``method`` (one of :data:`METHODS`), ``z_dim``, ``hidden`` (encoder/decoder/score-net MLP
    widths), ``noise_dim`` (implicit encoder's ε, default z_dim), ``steps``, ``batch_size``,
    ``lr``, ``est_lr`` (score estimator), ``fit_steps`` (estimator updates per VAE step),
    ``made_hidden``, ``context_dim``, ``head_hidden``, ``head_layers``, ``confine`` (the
    conditional AR-CSM), ``nodes`` (its quadrature), ``seed``, ``time_limit`` (seconds, None:
    none), ``progress``.
    """

    FIELDS = dict(method="csm-implicit", z_dim=8, hidden=(300, 300), noise_dim=None, steps=2000,
                  batch_size=100, lr=1e-3, est_lr=2e-3, fit_steps=2, made_hidden=(256,),
                  context_dim=8, head_hidden=32, head_layers=2, confine=0.1, nodes=LATENT_NODES,
                  seed=0, time_limit=None, progress=True)

    def __init__(self, **kw):
        unknown = set(kw) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"unknown VAEConfig settings {sorted(unknown)}")
        for k, v in {**self.FIELDS, **kw}.items():
            setattr(self, k, v)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        for k in ("z_dim", "steps", "batch_size", "fit_steps"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"{k} must be a positive int; got {v!r}")
        if not (self.nodes % 2 == 1 and self.nodes >= 3):
            raise ValueError(f"nodes must be odd and >= 3; got {self.nodes}")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in ((k, getattr(self, k)) for k in self.FIELDS)}


def build_models(cfg: VAEConfig, x_dim: int = 784):
    """``(encoder, decoder, estimator)`` for a config (estimator None for the Gaussian VAE)."""
    torch.manual_seed(cfg.seed)
    hidden = tuple(cfg.hidden)
    if cfg.method == "elbo-gaussian":
        enc = GaussianEncoder(x_dim, cfg.z_dim, hidden)
    else:
        enc = ImplicitEncoder(x_dim, cfg.z_dim, hidden, cfg.noise_dim, IMPLICIT_BOUND)
    dec = BernoulliDecoder(cfg.z_dim, x_dim, hidden)
    est = None
    if cfg.method == "ssm-implicit":
        est = ScoreNet(cfg.z_dim, x_dim, hidden)
    elif cfg.method == "csm-implicit":
        est = conditional_arcsm(cfg.z_dim, x_dim, tuple(cfg.made_hidden), cfg.context_dim,
                                cfg.head_hidden, cfg.head_layers, cfg.confine, cfg.seed)
    return enc, dec, est


def _binarize(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return torch.bernoulli(probs, generator=generator)


def train_vae(cfg: VAEConfig, train_probs: Tensor, log=None) -> dict:
    """Train one VAE on grey-level images ``train_probs`` (N, x_dim) in [0, 1], dynamically
    binarised each batch. Returns ``dict(encoder, decoder, estimator, history, train_time,
    steps, step_time)``; ``history`` rows hold ``step``, ``recon`` (E log p(x|z)), ``elbo``
    (analytic for the Gaussian encoder, with the AR-CSM's log q for csm-implicit, None for
    ssm-implicit), ``est_loss`` and ``max_abs_z``."""
    if not torch.is_tensor(train_probs) or train_probs.dim() != 2:
        raise ValueError(f"train_probs must have shape (N, x_dim); got "
                         f"{tuple(getattr(train_probs, 'shape', ()))}")
    if float(train_probs.min()) < 0 or float(train_probs.max()) > 1:
        raise ValueError("train_probs must lie in [0, 1] (pixel intensities)")
    x_dim = train_probs.shape[1]
    enc, dec, est = build_models(cfg, x_dim)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=cfg.lr)
    est_opt = torch.optim.Adam(est.parameters(), lr=cfg.est_lr) if est is not None else None
    history, t0 = [], time.perf_counter()
    n = train_probs.shape[0]
    log_every = max(1, cfg.steps // 20)
    bar = tqdm(range(cfg.steps), desc=f"vae {cfg.method} z{cfg.z_dim}", unit="step",
               disable=not cfg.progress, leave=False)
    step = 0
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = _binarize(train_probs[idx], g)
        est_loss = None
        # 1. fit the score estimator to fresh encoder samples of this batch
        if est is not None:
            for _ in range(cfg.fit_steps):
                with torch.no_grad():
                    zs = enc(x)
                if cfg.method == "csm-implicit":
                    check_latent_support(zs)
                    loss_e = est.loss(zs, cond=x)
                else:
                    loss_e = sliced_score_loss(est, zs, x)
                est_opt.zero_grad()
                loss_e.backward()
                est_opt.step()
                est_loss = float(loss_e.detach())
        # 2. encoder + decoder on the ELBO
        z = enc(x)
        recon = dec.log_likelihood(x, z)
        lpz = log_prior(z)
        elbo = None
        if cfg.method == "elbo-gaussian":
            ent = enc.entropy(x)
            loss = -(recon + lpz + ent).mean()
            elbo = float((recon + lpz + ent).mean().detach())
        else:
            if cfg.method == "csm-implicit":
                s, lq = csm_score(est, z, x, cfg.nodes)
                elbo = float((recon + lpz - lq).mean().detach())
            else:
                with torch.no_grad():
                    s = est(z.detach(), x)
            loss = -(recon + lpz).mean() + entropy_surrogate(s, z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            row = dict(step=step, recon=float(recon.mean().detach()), elbo=elbo, est_loss=est_loss,
                       max_abs_z=float(z.detach().abs().max()),
                       time=time.perf_counter() - t0)
            history.append(row)
            bar.set_postfix(recon=f"{row['recon']:.1f}",
                            elbo="-" if elbo is None else f"{elbo:.1f}")
            if log:
                log(f"  [{cfg.method} z{cfg.z_dim}] step {step}: recon {row['recon']:.2f}"
                    + ("" if elbo is None else f", elbo {elbo:.2f}")
                    + ("" if est_loss is None else f", estimator loss {est_loss:.3f}"))
        if cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
            break
    train_time = time.perf_counter() - t0
    steps = step + 1 if cfg.steps else 0
    return dict(encoder=enc.eval(), decoder=dec.eval(),
                estimator=None if est is None else est.eval(), history=history,
                train_time=train_time, steps=steps,
                step_time=train_time / max(1, steps))


# ----------------------------------------------------------------------------- evaluation

def fit_proposal(samples: Tensor, inflate: float = 1.2, jitter: float = 1e-4
                 ) -> tuple[Tensor, Tensor]:
    """A Gaussian per row of ``samples`` (n, M, D): ``(mean (n, D), scale_tril (n, D, D))``
    with the sample covariance scaled by ``inflate²`` plus ``jitter²·I``."""
    if samples.dim() != 3 or samples.shape[1] < 2:
        raise ValueError(f"samples must have shape (n, M >= 2, D); got {tuple(samples.shape)}")
    if not inflate > 0 or not jitter > 0:
        raise ValueError(f"inflate and jitter must be > 0; got {inflate}, {jitter}")
    s = samples.double()
    mean = s.mean(1)
    c = s - mean[:, None]
    cov = c.transpose(1, 2) @ c / (s.shape[1] - 1)
    eye = torch.eye(s.shape[2], dtype=s.dtype)
    L = torch.linalg.cholesky(cov * inflate ** 2 + jitter ** 2 * eye)
    return mean.to(samples.dtype), L.to(samples.dtype)


def importance_log_likelihood(log_joint, mean: Tensor, scale_tril: Tensor, K: int = 1000,
                              defensive: float = 0.05, chunk: int = 250,
                              generator: torch.Generator | None = None) -> Tensor:
    """Importance-sampling estimate of ``log p(x) = log ∫ p(x, z) dz`` for n observations.

    ``log_joint(z)``: z (n, k, D) → (n, k), ``log p(x_i, z)``. The proposal of observation i is
    ``(1 − defensive)·N(mean_i, L_i L_iᵀ) + defensive·N(0, I)`` (the prior as a defensive
    component bounds the weights by ``p(x|z)/defensive``); ``mean`` (n, D), ``scale_tril``
    (n, D, D). Returns (n,): ``logsumexp_k[log p(x, z_k) − log r(z_k)] − log K`` (a stochastic
    lower bound: its expectation is ≤ log p(x)). K samples in chunks of ``chunk``."""
    if mean.dim() != 2 or scale_tril.shape != (*mean.shape, mean.shape[1]):
        raise ValueError(f"mean must be (n, D) and scale_tril (n, D, D); got "
                         f"{tuple(mean.shape)}, {tuple(scale_tril.shape)}")
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int; got {K!r}")
    if not 0 <= defensive < 1:
        raise ValueError(f"defensive must be in [0, 1); got {defensive}")
    n, D = mean.shape
    logdet = torch.log(torch.diagonal(scale_tril, dim1=1, dim2=2)).sum(1)  # (n,)
    out = []
    for k0 in range(0, K, chunk):
        k = min(chunk, K - k0)
        eps = torch.randn(n, k, D, generator=generator, dtype=mean.dtype)
        if defensive:
            from_prior = torch.rand(n, k, generator=generator) < defensive
        z = mean[:, None] + eps @ scale_tril.transpose(1, 2)
        if defensive:
            zp = torch.randn(n, k, D, generator=generator, dtype=mean.dtype)
            z = torch.where(from_prior[..., None], zp, z)
            # log N(z; mean, LLᵀ) for every z
            diff = (z - mean[:, None]).unsqueeze(-1)
            sol = torch.linalg.solve_triangular(scale_tril[:, None], diff, upper=False)[..., 0]
            lq = -0.5 * (sol * sol).sum(-1) - logdet[:, None] - 0.5 * D * _LOG2PI
            lr = torch.logaddexp(math.log1p(-defensive) + lq,
                                 math.log(defensive) + log_prior(z))
        else:
            lr = -0.5 * (eps * eps).sum(-1) - logdet[:, None] - 0.5 * D * _LOG2PI
        with torch.no_grad():
            out.append(log_joint(z) - lr)
    logw = torch.cat(out, 1)
    return torch.logsumexp(logw, 1) - math.log(K)


@torch.no_grad()
def vae_nll(encoder, decoder, x: Tensor, K: int = 1000, M: int = 256, batch: int = 10,
            inflate: float = 1.2, defensive: float = 0.05, seed: int = 0,
            progress: bool = True) -> Tensor:
    """Test negative log-likelihood (nats) of the decoder on binary images x (n, x_dim), (n,):
    per image, a Gaussian proposal fitted to M encoder samples (:func:`fit_proposal`), then
    :func:`importance_log_likelihood` with K samples."""
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"x must have shape (n, x_dim); got {tuple(getattr(x, 'shape', ()))}")
    if M < 2:
        raise ValueError(f"M must be >= 2; got {M}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the encoders draw their own noise
    res = []
    for i in tqdm(range(0, x.shape[0], batch), desc="nll", unit="batch", disable=not progress,
                  leave=False):
        xb = x[i:i + batch]
        n = xb.shape[0]
        zs = encoder(xb.repeat_interleave(M, 0)).view(n, M, -1)
        mean, L = fit_proposal(zs, inflate)

        def log_joint(z, xb=xb):
            return decoder.log_likelihood(xb[:, None, :], z) + log_prior(z)

        res.append(-importance_log_likelihood(log_joint, mean, L, K, defensive, generator=g))
    return torch.cat(res)


# ----------------------------------------------------------------------------- data

def binarized_mnist(data: str = "mnist5k", test_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[Tensor, Tensor]:
    """``(train_probs (N, 784) float32 in [0, 1], test (M, 784) binary float32)``.

    ``data="mnist5k"``: the embedded 5,000-image subset, split seeded into train/test
    (``test_fraction``); ``"mnist:DIR"``: MNIST IDX files in DIR (its train and test sets).
    Training images are intensities (binarised afresh every batch); the test images are
    binarised once, with a generator seeded by ``seed``."""
    from .data import load_images

    if data == "mnist5k":
        train, test = load_images("mnist5k").split(test_fraction, seed)
    elif data.startswith("mnist:"):
        root = data.split(":", 1)[1]
        train, test = load_images("mnist", root, True), load_images("mnist", root, False)
    else:
        raise ValueError(f"data must be 'mnist5k' or 'mnist:DIR'; got {data!r}")

    def probs(d):
        return d.images.reshape(len(d), -1).float() / (d.levels - 1)

    g = torch.Generator().manual_seed(seed + 12345)
    return probs(train), torch.bernoulli(probs(test), generator=g)
