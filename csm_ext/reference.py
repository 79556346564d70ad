"""Pure-PyTorch twins of the fused head op: the references tests compare against, and the
competitors the benchmarks time.

All share the signature of :func:`csm_ext.ops.head_jets` and return ``(E, dE, d2E)`` of shape
(N,), differentiable (the autograd one twice):

* :func:`head_jets_ref` — the energy written plainly, its x-derivatives by autograd
  double-backward (``create_graph=True``). The reference of record.
* :func:`head_jets_eager` — the Taylor-mode jet recursion written by hand with batched matmuls
  (the strongest plain-PyTorch competitor; autograd does the backward).
* :func:`head_jets_func` — ``torch.func`` nested forward-mode ``jvp``.

and of the quadrature ops (signature of :func:`csm_ext.ops.head_logz`):

* :func:`head_node_energies_ref` — the (N, G) energies ``E(z_n, t_g)`` on quadrature nodes,
  through an (N, G, H) intermediate (what the fused op never stores);
* :func:`head_logz_ref` — ``log Z_n = logsumexp_g(−E(z_n, t_g) + log_weights_g)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["activation_fn", "head_energy_ref", "head_jets_ref", "head_jets_eager",
           "head_jets_func", "head_node_energies_ref", "head_logz_ref"]


def activation_fn(name: str):
    """The activation φ by name (``softplus``, ``tanh``, ``silu``)."""
    try:
        return {"softplus": F.softplus, "tanh": torch.tanh, "silu": F.silu}[name]
    except KeyError:
        raise ValueError(f"activation must be one of softplus, tanh, silu; got {name!r}") from None


def head_energy_ref(z: Tensor, x: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor,
                    alpha: float = 0.0, activation: str = "softplus") -> Tensor:
    """E for each element: ``w·h_L + alpha·x²/2`` with ``h_1 = φ(z + u·x)``,
    ``h_{l+1} = φ(W_l h_l + b_l)``. Shapes as in :func:`csm_ext.ops.head_jets`; returns (N,)."""
    phi = activation_fn(activation)
    h = phi(z + x[:, None] * u)
    for l in range(W.shape[0]):
        h = phi(torch.addmm(b[l], h, W[l].t()))
    return h @ w + 0.5 * alpha * x * x


def head_jets_ref(z, x, u, W, b, w, alpha=0.0, activation="softplus"):
    """(E, dE, d2E) by autograd double-backward through :func:`head_energy_ref`."""
    with torch.enable_grad():
        # A fresh node for x: derivatives are taken along this path only, even when x also
        # feeds z upstream (as it does in an autoregressive model).
        xr = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        E = head_energy_ref(z, xr, u, W, b, w, alpha, activation)
        (dE,) = torch.autograd.grad(E.sum(), xr, create_graph=True)
        (d2E,) = torch.autograd.grad(dE.sum(), xr, create_graph=True)
    return E, dE, d2E


def _activation_derivs(name: str, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """φ(a), φ'(a), φ''(a) with plain tensor ops."""
    if name == "softplus":
        s = torch.sigmoid(a)
        return F.softplus(a), s, s * (1 - s)
    if name == "tanh":
        t = torch.tanh(a)
        p = 1 - t * t
        return t, p, -2 * t * p
    if name == "silu":
        s = torch.sigmoid(a)
        q = s * (1 - s)
        return a * s, s + a * q, q * (2 + a * (1 - 2 * s))
    raise ValueError(f"activation must be one of softplus, tanh, silu; got {name!r}")


def head_jets_eager(z, x, u, W, b, w, alpha=0.0, activation="softplus"):
    """(E, dE, d2E) by the forward-mode jet recursion in plain PyTorch (autograd backward)."""
    a = z + x[:, None] * u
    f, d1, d2 = _activation_derivs(activation, a)
    h, h1, h2 = f, d1 * u, d2 * (u * u)  # a' = u, a'' = 0
    for l in range(W.shape[0]):
        # The three jet components through the same matrix; separate products measure faster
        # than one product of the rows stacked by torch.cat (which copies them), eager and
        # compiled alike.
        Wt = W[l].t()
        a, a1, a2 = torch.addmm(b[l], h, Wt), h1 @ Wt, h2 @ Wt
        f, d1, d2 = _activation_derivs(activation, a)
        h, h1, h2 = f, d1 * a1, d2 * a1 * a1 + d1 * a2
    return h @ w + 0.5 * alpha * x * x, h1 @ w + alpha * x, h2 @ w + alpha


def head_jets_func(z, x, u, W, b, w, alpha=0.0, activation="softplus"):
    """(E, dE, d2E) by ``torch.func`` nested forward-mode jvp in x (autograd backward)."""
    from torch.func import jvp

    def energy(xv):
        return head_energy_ref(z, xv, u, W, b, w, alpha, activation)

    def energy_and_slope(xv):
        return jvp(energy, (xv,), (torch.ones_like(xv),))

    (E, dE), (_, d2E) = jvp(energy_and_slope, (x,), (torch.ones_like(x),))
    return E, dE, d2E


def head_node_energies_ref(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
                           activation: str, nodes: Tensor) -> Tensor:
    """Energies of every element at every quadrature node: (N, G), entry (n, g) is
    ``E(z_n, t_g) = w·h_L + alpha·t_g²/2`` with ``h_1 = φ(z_n + u·t_g)``. z (N, H), nodes (G,);
    the weights as in :func:`csm_ext.ops.head_jets`. Materialises (N, G, H)."""
    phi = activation_fn(activation)
    h = phi(z[:, None, :] + nodes[None, :, None] * u)
    for l in range(W.shape[0]):
        h = phi(torch.add(h @ W[l].t(), b[l]))
    return h @ w + 0.5 * alpha * nodes * nodes


def head_logz_ref(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
                  activation: str, nodes: Tensor, log_weights: Tensor) -> Tensor:
    """Log-normalisers (N,): ``logsumexp_g(−E(z_n, t_g) + log_weights_g)``, the quadrature of
    ``log ∫ exp(−E(z_n, t)) dt`` with nodes (G,) and log-weights (G,)."""
    E = head_node_energies_ref(z, u, W, b, w, alpha, activation, nodes)
    return torch.logsumexp(log_weights - E, dim=1)
