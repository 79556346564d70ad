"""1-D quadrature for the conditionals of an AR energy model: rules, and exact grid sampling.

Every conditional ``q(x_d | x_<d) ∝ exp(−E_d(x_d))`` is one-dimensional, so its normaliser is the
integral ``Z = ∫_I exp(−E(t)) dt`` over the model's support ``I = [lo, hi]``, which a quadrature
rule with nodes ``t_g`` and weights ``w_g`` computes as ``log Z = logsumexp_g(−E(t_g) + log w_g)``.
The energies are smooth in ``t`` (the head is a smooth network), so the error falls fast with the
number of nodes G; :func:`csm_ext.models.ARCSM.quadrature_error` measures it (G against 2G−1)
rather than assuming it.

Rules: ``"simpson"`` (composite Simpson on a uniform grid, G odd; error O(h⁴)) and
``"gauss-legendre"`` (exponential convergence for integrands resolved by the nodes; nodes
cluster at the ends of I). Sampling uses the uniform grid: :func:`sample_grid` draws a cell
from the masses of the piecewise-exponential interpolant of ``exp(−E)`` between nodes and a
point inside it by its exact inverse CDF.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["RULES", "rule", "sample_grid", "cell_log_masses"]

RULES = ("simpson", "gauss-legendre")


def _check_support(support) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in support)
    except (TypeError, ValueError):
        raise ValueError(f"support must be (lo, hi); got {support!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"support must be (lo, hi) with finite lo < hi; got {support!r}")
    return lo, hi


def rule(support, nodes: int, kind: str = "simpson", dtype=torch.float32,
         device=None) -> tuple[Tensor, Tensor]:
    """Quadrature nodes (G,) and log-weights (G,) on ``support = (lo, hi)``.

    ``kind="simpson"`` needs an odd ``nodes`` >= 3 (composite Simpson's rule on a uniform grid,
    which the grid sampler shares); ``"gauss-legendre"`` any ``nodes`` >= 2. Computed in float64,
    returned in ``dtype``."""
    lo, hi = _check_support(support)
    if not isinstance(nodes, int) or nodes < 2:
        raise ValueError(f"nodes must be an int >= 2; got {nodes!r}")
    if kind == "simpson":
        if nodes < 3 or nodes % 2 == 0:
            raise ValueError(f"nodes must be odd and >= 3 for Simpson's rule; got {nodes}")
        t = torch.linspace(lo, hi, nodes, dtype=torch.float64)
        h = (hi - lo) / (nodes - 1)
        wts = torch.full((nodes,), 2.0, dtype=torch.float64)
        wts[1::2] = 4.0
        wts[0] = wts[-1] = 1.0
        wts *= h / 3
    elif kind == "gauss-legendre":
        x, wl = np.polynomial.legendre.leggauss(nodes)
        t = torch.from_numpy(0.5 * (hi - lo) * x + 0.5 * (hi + lo))
        wts = torch.from_numpy(0.5 * (hi - lo) * wl)
    else:
        raise ValueError(f"kind must be one of {RULES}; got {kind!r}")
    return t.to(dtype=dtype, device=device), wts.log().to(dtype=dtype, device=device)


def cell_log_masses(E: Tensor, h: float) -> Tensor:
    """Log-masses (n, G−1) of the cells between uniform grid nodes (spacing ``h``) under the
    piecewise-exponential interpolant of ``exp(−E)``: cell g has mass
    ``h·exp(−E_g)·(1 − exp(−Δ))/Δ`` with ``Δ = E_{g+1} − E_g``."""
    E0, E1 = E[:, :-1], E[:, 1:]
    delta = E1 - E0
    # log((1 − e^{−Δ})/Δ) for either sign of Δ without overflow: with D = |Δ|,
    # Δ > 0: log(1 − e^{−D}) − log D;  Δ < 0: D + log(1 − e^{−D}) − log D;  Δ → 0: −Δ/2.
    D = delta.abs()
    small = D < 1e-6
    safe = torch.where(small, torch.ones_like(D), D)
    log_ratio = torch.log(-torch.expm1(-safe)) - torch.log(safe) + torch.where(delta < 0, D, 0)
    log_ratio = torch.where(small, -0.5 * delta, log_ratio)
    return math.log(h) - E0 + log_ratio


def sample_grid(E: Tensor, nodes: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One exact draw per row from the piecewise-exponential density defined by node energies.

    ``E`` (n, G) energies at the uniform grid ``nodes`` (G,); returns (n,) points in
    [nodes[0], nodes[-1]]. The cell is drawn from the cell masses (:func:`cell_log_masses`), the
    point inside it by the inverse CDF of ``exp(−(E_g + Δ·s))``, s ∈ [0, 1]."""
    if E.dim() != 2 or E.shape[1] != nodes.shape[0] or nodes.shape[0] < 2:
        raise ValueError(f"E must have shape (n, {nodes.shape[0]}) with G >= 2 nodes; got "
                         f"{tuple(E.shape)}")
    n = E.shape[0]
    h = float(nodes[1] - nodes[0])
    logm = cell_log_masses(E, h)
    gdev = generator.device if generator is not None else E.device
    u = torch.rand(n, 2, generator=generator, dtype=E.dtype, device=gdev).to(E.device)
    probs = torch.softmax(logm, dim=1)
    cdf = probs.cumsum(1)
    cell = torch.searchsorted(cdf, (u[:, :1] * cdf[:, -1:]).contiguous()).squeeze(1)
    cell = cell.clamp(max=E.shape[1] - 2)
    delta = (E.gather(1, cell[:, None] + 1) - E.gather(1, cell[:, None])).squeeze(1)
    v = u[:, 1]
    # Inverse CDF inside the cell, density ∝ e^{−Δ·s} on [0, 1]: for D = |Δ| > 0,
    # s = −log(1 − v·(1 − e^{−D}))/D, mirrored (s → 1 − s, v → 1 − v) when Δ < 0; s = v as Δ → 0.
    D = delta.abs()
    small = D < 1e-6
    safe = torch.where(small, torch.ones_like(D), D)
    neg = delta < 0
    vv = torch.where(neg, 1 - v, v)
    s = -torch.log1p(vv * torch.expm1(-safe)) / safe
    s = torch.where(neg, 1 - s, s)
    s = torch.where(small, v, s).clamp(0.0, 1.0)
    return nodes[cell] + h * s
