"""The comparison objectives against independent computations (float64)."""
from __future__ import annotations

import math

import pytest
import torch

from csm_ext import EnergyHead, baselines, csm_loss


def gaussian_energy(precision):
    return lambda x: 0.5 * ((x @ precision) * x).sum(1)


def random_precision(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    return A @ A.T / D + torch.eye(D, dtype=torch.float64)


def test_exact_sm_matches_the_analytic_gaussian_value():
    D = 5
    P = random_precision(D)
    x = torch.randn(7, D, dtype=torch.float64)
    loss = baselines.exact_score_matching_loss(gaussian_energy(P), x, reduction="none")
    expected = 0.5 * ((x @ P) ** 2).sum(1) - torch.trace(P)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("variance_reduced", [False, True])
def test_sliced_sm_is_unbiased_for_exact_sm(variance_reduced):
    D = 4
    P = random_precision(D, seed=1)
    x = torch.randn(3, D, dtype=torch.float64)
    exact = baselines.exact_score_matching_loss(gaussian_energy(P), x, reduction="none")
    sliced = baselines.sliced_score_matching_loss(
        gaussian_energy(P), x, n_projections=20_000, variance_reduced=variance_reduced,
        reduction="none", generator=torch.Generator().manual_seed(0))
    # vᵀPv has variance 2·tr(P²) for Gaussian v; the sliced ½(vᵀPx)² adds its own.
    tol = 6 * math.sqrt(2 * torch.trace(P @ P).item() + (x @ P).pow(2).sum(1).max().item() ** 2)
    assert (sliced - exact).abs().max().item() < tol / math.sqrt(20_000)


def test_dsm_is_minimised_by_the_noisy_data_density():
    """DSM fits the density of x + σε: for N(0, v) data the best Gaussian model has variance
    v + σ² (every model sees the same data and noise draws, which must be independent)."""
    v, sigma, D, B = 0.5, 0.3, 3, 200_000
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * math.sqrt(v)
    losses = {}
    for scale in (0.8, 1.0, 1.25):
        tau = scale * (v + sigma ** 2)
        energy = gaussian_energy(torch.eye(D, dtype=torch.float64) / tau)
        losses[scale] = baselines.denoising_score_matching_loss(
            energy, x, sigma, generator=torch.Generator().manual_seed(12345)).item()
    assert losses[1.0] < losses[0.8] and losses[1.0] < losses[1.25]


def test_csm_equals_exact_sm_on_a_fully_factorised_model():
    """With contexts that do not depend on x, E(x) = Σ_d E_d(x_d) and CSM = exact SM."""
    B, D, K = 6, 5, 3
    head = EnergyHead(context_dim=K, hidden=9, layers=3, activation="tanh", confine=0.2).double()
    head.backend = "autograd"  # exact SM differentiates the energy twice
    ctx = torch.randn(1, D, K, dtype=torch.float64).expand(B, D, K)
    x = torch.randn(B, D, dtype=torch.float64)

    def joint_energy(xv):
        return head(ctx, xv).sum(1)

    exact = baselines.exact_score_matching_loss(joint_energy, x, reduction="none")
    torch.testing.assert_close(csm_loss(head, ctx, x, reduction="none"), exact)


def test_energy_mlp_shapes_and_bad_input():
    net = baselines.EnergyMLP(6, hidden=8, layers=2).double()
    assert net(torch.randn(4, 6, dtype=torch.float64)).shape == (4,)
    with pytest.raises(ValueError, match="x must have shape"):
        baselines.exact_score_matching_loss(net, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma"):
        baselines.denoising_score_matching_loss(net, torch.randn(2, 6, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="n_projections"):
        baselines.sliced_score_matching_loss(net, torch.randn(2, 6, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="reduction"):
        baselines.exact_score_matching_loss(net, torch.randn(2, 6, dtype=torch.float64),
                                            reduction="avg")


def test_conditional_dsm_is_minimised_by_the_noisy_conditionals():
    """An exactly Gaussian head (w = 0, confine = 1/τ) on N(0, v) data: best τ is v + σ²."""
    v, sigma, B, D = 0.4, 0.2, 100_000, 2
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * math.sqrt(v)
    ctx = torch.zeros(B, D, 1, dtype=torch.float64)
    losses = {}
    for scale in (0.8, 1.0, 1.25):
        head = EnergyHead(1, hidden=4, layers=1, confine=1 / (scale * (v + sigma ** 2))).double()
        with torch.no_grad():
            head.w.zero_()
        losses[scale] = baselines.conditional_dsm_loss(
            head, ctx, x, sigma, generator=torch.Generator().manual_seed(7)).item()
    assert losses[1.0] < losses[0.8] and losses[1.0] < losses[1.25]


def test_sliced_csm_is_unbiased_for_csm():
    """Averaged over projections, the sliced estimate equals the exact CSM loss of an
    autoregressive model whose contexts depend on earlier dimensions."""
    B, D, K = 3, 4, 2
    torch.manual_seed(0)
    head = EnergyHead(K, hidden=6, layers=2, activation="silu", backend="autograd").double()
    strictly_lower = torch.ones(D, D, dtype=torch.float64).tril(-1)[:, :, None]
    mix = torch.randn(D, D, K, dtype=torch.float64) * strictly_lower  # c_d sees x_<d only

    def context_fn(x):
        return torch.tanh(torch.einsum("bj,djk->bdk", x, mix))

    x = torch.randn(B, D, dtype=torch.float64)
    exact = csm_loss(head, context_fn(x), x, reduction="none")
    g = torch.Generator().manual_seed(3)
    samples = torch.stack([baselines.sliced_csm_loss(context_fn, head, x, reduction="none",
                                                     generator=g) for _ in range(4000)])
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((samples.mean(0) - exact).abs() < 5 * stderr).all()
    assert (samples.std(0) > 0).all()  # it is an estimate, not the exact value
