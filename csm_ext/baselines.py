"""The score-matching objectives CSM is compared against, written from their definitions.

All work on a *full-joint* energy ``E(x)`` (one scalar per sample, model ``p(x) ∝ exp(−E(x))``,
score ``s = −∇_x E``) and return the per-sample loss (reduce with ``reduction`` as in
:func:`csm_ext.csm_loss`):

* :func:`exact_score_matching_loss` — ``½|s|² + tr(∇_x s)``, the Hessian trace by D backward
  passes (Hyvärinen 2005).
* :func:`sliced_score_matching_loss` — ``½(vᵀs)² + vᵀ∇_x(vᵀs)`` with random projections v, and
  its variance-reduced form ``½|s|² + vᵀ∇_x(vᵀs)`` (Song et al. 2019).
* :func:`denoising_score_matching_loss` — ``½|s(x + σε) + ε/σ|²`` (Vincent 2011).

:class:`EnergyMLP` is the matched full-joint energy network the benchmarks use.

Two objectives train an *autoregressive* energy model (a context network + an
:class:`~csm_ext.EnergyHead`, as CSM does), so that all methods can be compared on the same
model with the CSM loss as the common yardstick:

* :func:`conditional_dsm_loss` — DSM on each conditional: ``Σ_d ½(s_d(x̃_d | x_<d) + ε_d/σ)²``,
  the head seeing the noisy ``x̃_d`` and the context the clean ``x_<d``;
* :func:`sliced_csm_loss` — CSM with its trace term ``Σ_d ∂s_d/∂x_d`` replaced by the
  Hutchinson/sliced estimate ``vᵀ∇_x(vᵀs)`` (one backward pass through the context network too;
  needs a twice-differentiable head, ``backend="autograd"``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .loss import reduce
from .reference import activation_fn

__all__ = ["EnergyMLP", "exact_score_matching_loss", "sliced_score_matching_loss",
           "denoising_score_matching_loss", "conditional_dsm_loss", "sliced_csm_loss", "reduce"]


class EnergyMLP(nn.Module):
    """A full-joint energy ``E(x)``: an MLP from (B, D) to (B,) with smooth activations.

    Args:
        dim: D.  hidden: width.  layers: number of hidden layers (>= 1).
        activation: ``"softplus"``, ``"tanh"`` or ``"silu"`` (needs second derivatives).
        confine: adds ``confine·|x|²/2`` so ``exp(−E)`` is integrable.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 2,
                 activation: str = "softplus", confine: float = 0.01):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"dim, hidden and layers must be >= 1; got {dim}, {hidden}, {layers}")
        self.phi = activation_fn(activation)
        sizes = [dim] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(hidden, 1)
        self.confine = float(confine)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.hidden:
            h = self.phi(layer(h))
        return self.out(h).squeeze(-1) + 0.5 * self.confine * (x * x).sum(-1)


def _energy_grad(energy, x: Tensor) -> tuple[Tensor, Tensor]:
    """A fresh leaf for x (so only E's dependence on it counts) and ∇_x E, differentiable."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    return x, grad


def _check_x(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, D); got {tuple(x.shape)}")


def exact_score_matching_loss(energy, x: Tensor, reduction: str = "mean") -> Tensor:
    """``½|∇E|² − tr(∇²E)`` per sample; the trace costs one backward pass per dimension.

    ``energy`` maps (B, D) to (B,); ``x`` is (B, D)."""
    _check_x(x)
    with torch.enable_grad():
        x, grad = _energy_grad(energy, x)
        trace = torch.zeros_like(grad[:, 0])
        for d in range(x.shape[1]):
            (row,) = torch.autograd.grad(grad[:, d].sum(), x, create_graph=True)
            trace = trace + row[:, d]
    return reduce(0.5 * (grad * grad).sum(1) - trace, reduction)


def sliced_score_matching_loss(energy, x: Tensor, n_projections: int = 1,
                               variance_reduced: bool = False, reduction: str = "mean",
                               generator: torch.Generator | None = None) -> Tensor:
    """Sliced score matching with Gaussian projections ``v ~ N(0, I)``.

    Per sample, averaged over projections: ``½(vᵀ∇E)² − vᵀ∇²E v``, or with
    ``variance_reduced=True`` the exact ``½|∇E|²`` in place of its sliced estimate.
    One extra backward pass per projection, whatever D is."""
    _check_x(x)
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1; got {n_projections}")
    with torch.enable_grad():
        x, grad = _energy_grad(energy, x)
        total = torch.zeros_like(grad[:, 0])
        for _ in range(n_projections):
            v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            grad_v = (grad * v).sum(1)                       # vᵀ∇E
            (hvp,) = torch.autograd.grad(grad_v.sum(), x, create_graph=True)  # ∇²E v
            first = 0.5 * (grad * grad).sum(1) if variance_reduced else 0.5 * grad_v ** 2
            total = total + first - (hvp * v).sum(1)
    return reduce(total / n_projections, reduction)


def denoising_score_matching_loss(energy, x: Tensor, sigma: float, reduction: str = "mean",
                                  generator: torch.Generator | None = None) -> Tensor:
    """``½|s(x̃) + ε/σ|²`` with ``x̃ = x + σε``: the model's score at the noisy point regressed
    on the score of the Gaussian noise kernel. It fits the density of ``x̃``, not of ``x``."""
    _check_x(x)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.enable_grad():
        _, grad = _energy_grad(energy, x + sigma * eps)
    residual = -grad + eps / sigma
    return reduce(0.5 * (residual * residual).sum(1), reduction)


def conditional_dsm_loss(head, ctx: Tensor, x: Tensor, sigma: float, reduction: str = "mean",
                         generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching of every conditional ``q(x_d | x_<d)`` of an autoregressive
    energy model: ``Σ_d ½(s_d(x_d + σε_d) + ε_d/σ)²`` per sample, where ``s_d = −∂E_d/∂x_d`` is
    evaluated by ``head`` at the noisy value with the clean context ``ctx`` (B, ..., K)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    _, dE, _ = head.jets(ctx, x + sigma * eps)
    residual = -dE + eps / sigma
    return reduce(0.5 * (residual * residual).reshape(x.shape[0], -1).sum(1), reduction)


def sliced_csm_loss(context_fn, head, x: Tensor, reduction: str = "mean",
                    generator: torch.Generator | None = None) -> Tensor:
    """Sliced (Hutchinson) estimate of the CSM loss: ``½|s|² + vᵀ∇_x(vᵀs)`` with
    ``v ~ N(0, I)``, where ``s_d = −∂E_d/∂x_d`` and ``context_fn(x)`` gives the contexts
    (B, D, K). Unbiased for :func:`csm_ext.csm_loss` (the off-diagonal terms through the context
    vanish in expectation) but noisier; ``x`` is (B, D)."""
    _check_x(x)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        _, dE, _ = head.jets(context_fn(x), x)
        s = -dE
        (jv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)  # ∇_x(vᵀs)
    return reduce(0.5 * (s * s).sum(1) + (jv * v).sum(1), reduction)
