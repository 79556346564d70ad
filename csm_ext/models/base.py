"""One autoregressive energy model for any context network: :class:`ARCSM`.

An AR-CSM models ``q(x_d | x_<d) ∝ exp(−E_d)`` with ``E_d = head(c_d, x_d)``: a context network
maps x to contexts ``c_d`` that depend on ``x_<d`` only, and the shared
:class:`~csm_ext.EnergyHead` alone sees ``x_d``. Everything that follows from that structure
lives here, once, for every context network:

* energies with their x-derivatives (:meth:`ARCSM.jets`), scores, the CSM loss;
* the **normalised** model: each conditional is 1-D, so its normaliser
  ``Z_d = ∫_I exp(−E_d(t)) dt`` over the model's support ``I`` is a quadrature
  (:mod:`csm_ext.quadrature`, the fused op :func:`csm_ext.ops.head_logz`), which gives the exact
  log-likelihood (:meth:`ARCSM.log_prob`, :meth:`ARCSM.bits_per_dim`) with its accuracy stated
  (:meth:`ARCSM.quadrature_error`), the joint score (:meth:`ARCSM.joint_score`) and maximum
  likelihood for the same unnormalised model (``objective="mle"``, or ``"hybrid"``);
* sampling: exact inverse-CDF sampling of every conditional on the quadrature grid
  (``method="grid"``) or the paper's per-dimension Langevin (``method="langevin"``).

A context network subclasses :class:`ARCSM` and provides ``dim``, ``context_dim``, ``head``,
an ``order`` buffer (flat indices in generation order), a ``config`` dict (its constructor's
arguments, so :meth:`ARCSM.from_config` rebuilds it), ``context(x)`` and ``context_at(x, d)``;
optionally ``_flatten``/``_unflatten`` for non-flat inputs and ``_sweep`` for an incremental
context during sampling.

Conditional models ``q(x | cond)`` (``config["cond_dim"] > 0``, e.g. ``MADECSM(cond_dim=...)``)
take ``cond`` (B, cond_dim) in ``context``, ``context_at`` and ``_sweep``; every method here then
takes ``cond=`` and passes it on. A conditional model refuses a missing ``cond`` and an
unconditional one an extra ``cond``, with an error that says so.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import quadrature, sampling
from ..loss import REDUCTIONS, csm_loss_from_jets
from .common import ARModel

__all__ = ["ARCSM", "OBJECTIVES", "SAMPLERS", "DEFAULT_NODES"]

OBJECTIVES = ("csm", "mle", "hybrid")
SAMPLERS = ("grid", "langevin")
# Quadrature nodes (Simpson, odd) for log Z; the G vs 2G−1 disagreement on trained models is
# far below 1e-4 nats per dimension with this many (see quadrature_error and BENCHMARKS.md).
DEFAULT_NODES = 257


class ARCSM(ARModel):
    """Base class of autoregressive score-matching models (see the module docstring).
    The support, ``from_config``, the shape hooks and ``bits_per_dim`` come from
    :class:`~csm_ext.models.common.ARModel`, which the maximum-likelihood baselines share.

    Config keys every subclass stores (constructor arguments of the same names):
    ``support`` (``(lo, hi)`` or None), ``objective`` (``"csm"``, ``"mle"``, ``"hybrid"``),
    ``mle_weight`` (λ of the hybrid ``CSM + λ·NLL``), ``backend`` (the head's).
    """

    dim: int
    context_dim: int
    config: dict

    def _init_common(self, support, objective, mle_weight):
        """Validate and store the settings shared by every AR-CSM (call from ``__init__``)."""
        self.config["support"] = None
        self.support = support
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
        if not (isinstance(mle_weight, (int, float)) and mle_weight >= 0):
            raise ValueError(f"mle_weight must be a number >= 0; got {mle_weight!r}")
        self.config["objective"], self.config["mle_weight"] = objective, float(mle_weight)

    # ---------------------------------------------------------------- settings

    @property
    def backend(self) -> str:
        """How the head computes its jets and quadratures: ``"fused"`` (the csm_ext kernels) or
        a pure-PyTorch reference (``"autograd"``, ...). Settable."""
        return self.head.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.head.backend = value
        self.config["backend"] = value

    @property
    def objective(self) -> str:
        """The training objective of :meth:`loss` and ``forward`` (settable)."""
        return self.config["objective"]

    @objective.setter
    def objective(self, value: str) -> None:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {value!r}")
        self.config["objective"] = value

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning input (0: an unconditional model)."""
        return int(self.config.get("cond_dim", 0) or 0)

    def _check_cond_batch(self, x: Tensor, cond) -> None:
        """cond must be given exactly for a conditional model, with x's batch size."""
        k = self.cond_dim
        if cond is None:
            if k:
                raise ValueError(f"{type(self).__name__} is conditional (cond_dim={k}): pass "
                                 f"cond=, a tensor of shape (B, {k})")
            return
        if not k:
            raise ValueError(f"cond was given but {type(self).__name__} is unconditional "
                             "(cond_dim=0)")
        if not torch.is_tensor(cond) or cond.dim() != 2 or cond.shape[1] != k:
            raise ValueError(f"cond must have shape (B, {k}); got "
                             f"{tuple(getattr(cond, 'shape', ()))}")
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch size {cond.shape[0]} but x has {x.shape[0]}")
        if cond.dtype != self.head.u.dtype:
            raise ValueError(f"cond has dtype {cond.dtype} but the model's parameters are "
                             f"{self.head.u.dtype}")

    def _ctx(self, x: Tensor, cond=None) -> Tensor:
        """``context(x)``, or ``context(x, cond=cond)`` for a conditional model (checked)."""
        self._check_cond_batch(x, cond)
        return self.context(x) if cond is None else self.context(x, cond=cond)

    # ---------------------------------------------------------------- shapes (hooks)

    def _sweep(self, x: Tensor, progress: bool = False) -> Iterator[tuple[int, Tensor]]:
        """For sampling: yield ``(d, c_d)`` for every flat dimension d in the order, where x
        (n, D) holds the values set so far (the caller writes ``x[:, d]`` before the next
        step). Subclasses with an incremental context override this."""
        for d in tqdm(self.order.tolist(), desc="sampling", unit="dim", disable=not progress,
                      leave=False):
            yield d, self.context_at(x, d)

    # ---------------------------------------------------------------- energies

    def jets(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(E, dE, d2E)``, each with the shape of x: energies and their derivatives in their
        own element (``cond`` (B, cond_dim): a conditional model's conditioning input)."""
        return self.head.jets(self._ctx(x, cond), x)

    def energy(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Energies E with the shape of x (−log q(x_d | x_<d) up to a constant in x_d)."""
        return self.jets(x, cond)[0]

    def score(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Per-element conditional scores ``s_d = −∂E_d/∂x_d`` with the shape of x (the score
        of the marginal q(x_≤d) in x_d; :meth:`joint_score` is ∇_x log q(x))."""
        return -self.jets(x, cond)[1]

    # ---------------------------------------------------------------- normalisation

    def quadrature_rule(self, nodes: int | None = None, dtype=None, device=None):
        """Simpson nodes (G,) and log-weights (G,) on the support (``nodes`` odd, default
        :data:`DEFAULT_NODES`)."""
        support = self._require_support()
        p = self.head.u
        return quadrature.rule(support, DEFAULT_NODES if nodes is None else nodes, "simpson",
                               dtype or p.dtype, device or p.device)

    def log_normalisers(self, x: Tensor, nodes: int | None = None, ctx: Tensor | None = None,
                        cond: Tensor | None = None) -> Tensor:
        """``log Z_d`` for every element, with the shape of x: ``log ∫_I exp(−E_d(t)) dt`` by
        Simpson's rule with ``nodes`` nodes (fused op for ``backend="fused"``)."""
        t, lw = self.quadrature_rule(nodes, x.dtype, x.device)
        return self.head.logz(self._ctx(x, cond) if ctx is None else ctx, t, lw)

    def log_prob(self, x: Tensor, nodes: int | None = None, cond: Tensor | None = None
                 ) -> Tensor:
        """Normalised log-density (nats) of each sample, (B,):
        ``Σ_d [−E_d(x_d) − log Z_d]``, a proper density on the support box (data outside it
        raise). Differentiable in x (see :meth:`joint_score`) and in the parameters.
        ``nodes``: quadrature size (odd; default :data:`DEFAULT_NODES`); ``cond``: the
        conditioning input (B, cond_dim) of a conditional model (then ``log q(x | cond)``)."""
        self._check_in_support(x)
        ctx = self._ctx(x, cond)
        E = self.head(ctx, x)
        logz = self.log_normalisers(x, nodes, ctx)
        return -(E + logz).reshape(x.shape[0], -1).sum(1)

    @torch.no_grad()
    def quadrature_error(self, x: Tensor, nodes: int | None = None,
                         cond: Tensor | None = None) -> dict:
        """How accurate :meth:`log_prob` is on x: ``log Z`` of every element with G nodes
        against 2G−1 nodes (the nested Simpson grid). Returns ``nodes``, ``max_abs`` (worst
        element, nats), ``mean_abs`` and ``max_per_sample`` (worst |Δ log_prob| over the
        batch, nats)."""
        G = DEFAULT_NODES if nodes is None else nodes
        ctx = self._ctx(x, cond)
        a = self.log_normalisers(x, G, ctx).double()
        b = self.log_normalisers(x, 2 * G - 1, ctx).double()
        diff = (a - b).abs()
        per_sample = (a - b).reshape(x.shape[0], -1).sum(1).abs()
        return dict(nodes=G, max_abs=float(diff.max()) if diff.numel() else 0.0,
                    mean_abs=float(diff.mean()) if diff.numel() else 0.0,
                    max_per_sample=float(per_sample.max()) if per_sample.numel() else 0.0)

    def joint_score(self, x: Tensor, nodes: int | None = None,
                    create_graph: bool = False, cond: Tensor | None = None) -> Tensor:
        """``∇_x log q(x)`` with the shape of x: the exact joint score of the normalised model
        (one backward pass through :meth:`log_prob`; x_j enters E_j and every later context).
        For a conditional model, ``∇_x log q(x | cond)`` (no gradient to ``cond``)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True) if not create_graph else x
            if not xg.requires_grad:
                xg = xg.requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xg, nodes, cond).sum(), xg,
                                       create_graph=create_graph)
        return g

    # ---------------------------------------------------------------- objectives

    def loss(self, x: Tensor, reduction: str = "mean", objective: str | None = None,
             mle_weight: float | None = None, nodes: int | None = None,
             cond: Tensor | None = None) -> Tensor:
        """Training loss per sample, reduced by ``reduction`` (``"mean"``, ``"sum"``,
        ``"none"`` → (B,)). ``objective`` (default: the model's, ``"csm"`` unless set):

        * ``"csm"`` — composite score matching ``Σ_d ½(E_d')² − E_d''`` (no normaliser);
        * ``"mle"`` — the negative log-likelihood ``−log_prob(x)`` (exact MLE of the same
          unnormalised model, up to the quadrature; costs G head evaluations per element);
        * ``"hybrid"`` — CSM + ``mle_weight``·NLL.

        ``cond`` (B, cond_dim): a conditional model's conditioning input.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        objective = self.objective if objective is None else objective
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
        lam = self.config["mle_weight"] if mle_weight is None else float(mle_weight)
        ctx = self._ctx(x, cond)
        if objective == "mle":
            per = self._nll(ctx, x, nodes)
        else:
            E, dE, d2E = self.head.jets(ctx, x)
            per = csm_loss_from_jets(dE, d2E, "none")
            if objective == "hybrid" and lam:
                per = per + lam * self._nll(ctx, x, nodes, E)
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.mean()

    def _nll(self, ctx, x, nodes, E=None):
        self._check_in_support(x)
        E = self.head(ctx, x) if E is None else E
        return (E + self.log_normalisers(x, nodes, ctx)).reshape(x.shape[0], -1).sum(1)

    def forward(self, x: Tensor, reduction: str = "mean") -> Tensor:
        """Same as :meth:`loss` with the model's objective (so DistributedDataParallel can wrap
        the model)."""
        return self.loss(x, reduction)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, n: int, method: str | None = None, nodes: int | None = None, steps: int = 100,
               step_size: float = 1e-2, anneal: float = 1.0, init=None, clip=None,
               denoise: float = 0.0, temperature: float = 1.0, progress: bool = True,
               generator: torch.Generator | None = None, device=None,
               cond: Tensor | None = None) -> Tensor:
        """Draw n samples, dimensions in the autoregressive order, the context of each computed
        once for the whole batch. Returns (n, D) (subclasses: their native shape).

        ``method="grid"`` (the default when the model has a support): exact inverse-CDF sampling of every conditional on the
        uniform quadrature grid of the support (``nodes`` nodes, default
        :data:`DEFAULT_NODES`): a cell from the masses of the piecewise-exponential interpolant
        of ``exp(−E/T)``, a point inside it by its inverse CDF. No chain, no mode-crossing
        problem. ``method="langevin"`` (the default without a support): the paper's
        per-dimension Langevin, ``steps`` steps
        ``x ← x − (ε/2)·E'/T + √ε·ξ`` with ε annealed from ``step_size·anneal`` to
        ``step_size``, started from ``init`` ("uniform" over ``clip`` — the default when
        ``clip`` is given —, "normal", "zeros" or a tensor).

        ``temperature`` T samples every conditional at ``q^(1/T)`` (T < 1: sharper).
        ``denoise=σ`` ends with the per-dimension Tweedie step ``x ← x + σ²·s(x)`` (models of
        data smoothed with N(0, σ²) noise); ``clip=(lo, hi)`` clamps the result.
        ``cond`` (n, cond_dim): a conditional model's conditioning input, one row per sample.
        """
        if method is None:
            method = "grid" if self.support is not None else "langevin"
        if method not in SAMPLERS:
            raise ValueError(f"method must be one of {SAMPLERS}; got {method!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        p = self.head.u
        device = p.device if device is None else device
        if method == "grid":
            t, _ = self.quadrature_rule(nodes, p.dtype, device)
            if init is not None and not torch.is_tensor(init):
                raise ValueError("init is a Langevin setting; method='grid' needs none")
            x = sampling.initial_points(n, self.dim, "zeros", None, generator, p.dtype, device)
        else:
            sampling.step_schedule(steps, step_size, anneal)  # validate before the long loop
            if torch.is_tensor(init) and init.dim() > 2:  # e.g. images (n, C, H, W)
                init = init.reshape(init.shape[0], -1)
            x = sampling.initial_points(n, self.dim, init, clip, generator, p.dtype, device)
        x = x.contiguous()
        self._check_cond_batch(x, cond)
        if n > 0:
            sweep = self._sweep(x, progress) if cond is None else self._sweep(x, progress,
                                                                              cond=cond)
            for d, ctx in sweep:
                if method == "grid":
                    E = self.head.node_energies(ctx, t)
                    x[:, d] = quadrature.sample_grid(E / temperature, t, generator)
                else:
                    with sampling.threads_for(n * self.head.hidden, x.device):
                        x[:, d] = sampling.langevin_1d(self.head, ctx, x[:, d], steps,
                                                       step_size, anneal, generator,
                                                       temperature)
        if denoise:
            x = x + denoise ** 2 * self._flatten(self.score(self._unflatten(x), cond))
        if clip is not None:
            x = x.clamp(*clip)
        return self._unflatten(x)
