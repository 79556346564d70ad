"""The fused quadrature ops (head_logz, head_node_energies) against their references, and the
quadrature rules and grid sampler they serve."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_head_args

from csm_ext import ops, quadrature, reference

ACTS = ops.ACTIVATIONS
ALPHA = 0.3
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def _weights(N, H, L, dtype=torch.float64, seed=0, requires_grad=False):
    z, _, u, W, b, w = make_head_args(N, H, L, dtype=dtype, seed=seed)
    return [t.requires_grad_(requires_grad) for t in (z, u, W, b, w)]


def _rule(G, dtype=torch.float64, support=(-2.0, 3.0)):
    kind = "simpson" if G % 2 == 1 and G >= 3 else "gauss-legendre"
    return quadrature.rule(support, G, kind, dtype)


def _assert_close(actual, expected, dtype, name):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=TOL[dtype] * 10,
                               atol=TOL[dtype] * 10 * scale, msg=lambda m: f"{name}: {m}")


def _values_and_grads(fn, args, out_seed):
    args = [a.detach().clone().requires_grad_(True) for a in args]
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(out_seed),
                    dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * g).sum(), args, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


@pytest.mark.parametrize(
    "act,L,N,H,G,dtype",
    [(a, L, 11, 5, 9, torch.float64) for a, L in itertools.product(ACTS, (1, 2, 3))]
    + [("softplus", 2, 0, 4, 5, torch.float64), ("tanh", 2, 3, 7, 2, torch.float64),
       ("silu", 3, 2, 3, 3001, torch.float64),      # G above the chunk size: nodes in chunks
       ("softplus", 2, 1500, 64, 129, torch.float32), ("tanh", 3, 700, 33, 64, torch.float32)],
)
def test_fused_matches_reference(act, L, N, H, G, dtype):
    z, u, W, b, w = _weights(N, H, L, dtype, seed=N + G)
    t, lw = _rule(G, dtype)
    for fused, ref in ((lambda *a: ops.head_logz(*a, ALPHA, act, t, lw),
                        lambda *a: reference.head_logz_ref(*a, ALPHA, act, t.double(),
                                                           lw.double())),
                       (lambda *a: ops.head_node_energies(*a, ALPHA, act, t),
                        lambda *a: reference.head_node_energies_ref(*a, ALPHA, act,
                                                                    t.double()))):
        out, grads = _values_and_grads(fused, (z, u, W, b, w), 1)
        ref_out, ref_grads = _values_and_grads(ref, [a.double() for a in (z, u, W, b, w)], 1)
        assert out.dtype == dtype
        _assert_close(out, ref_out, dtype, "out")
        for name, g, r in zip("z u W b w".split(), grads, ref_grads):
            _assert_close(g, r, dtype, name)


@pytest.mark.parametrize("act,L", list(itertools.product(ACTS, (1, 2, 3))))
def test_gradcheck_and_gradgradcheck_float64(act, L):
    args = _weights(4, 3, L, seed=L, requires_grad=True)
    t, lw = _rule(5)
    torch.autograd.gradcheck(lambda *a: ops.head_logz(*a, ALPHA, act, t, lw), args)
    torch.autograd.gradcheck(lambda *a: ops.head_node_energies(*a, ALPHA, act, t), args)
    if L == 2:
        torch.autograd.gradgradcheck(lambda *a: ops.head_logz(*a, ALPHA, act, t, lw), args)
        torch.autograd.gradgradcheck(lambda *a: ops.head_node_energies(*a, ALPHA, act, t), args)


def test_logz_is_the_normaliser():
    """Gaussian head (w = 0, confinement alpha): Z = ∫ exp(−alpha t²/2) dt over the support,
    to quadrature accuracy, for both rules."""
    z, u, W, b, w = _weights(3, 4, 2)
    w = torch.zeros_like(w)
    lo, hi = -3.0, 4.0
    exact = math.log(math.sqrt(2 * math.pi / 1.5) * 0.5 * (
        math.erf(hi * math.sqrt(1.5 / 2)) - math.erf(lo * math.sqrt(1.5 / 2))))
    for kind, G in (("simpson", 257), ("gauss-legendre", 48)):
        t, lw = quadrature.rule((lo, hi), G, kind, torch.float64)
        logz = ops.head_logz(z, u, W, b, w, 1.5, "softplus", t, lw)
        assert torch.allclose(logz, torch.full_like(logz, exact), atol=1e-8), kind


def test_nan_and_extreme_inputs():
    z, u, W, b, w = _weights(3, 4, 2)
    t, lw = _rule(9)
    z = z.clone()
    z[1, 2] = float("nan")
    z[2] *= 1e3
    logz = ops.head_logz(z, u, W, b, w, ALPHA, "softplus", t, lw)
    assert torch.isnan(logz[1]) and torch.isfinite(logz[[0, 2]]).all()


def test_deterministic_and_thread_count_invariant():
    args = _weights(3000, 32, 3, dtype=torch.float32, seed=4)
    t, lw = _rule(65, torch.float32)
    fn = lambda *a: ops.head_logz(*a, ALPHA, "silu", t, lw)  # noqa: E731
    first, second = _values_and_grads(fn, args, 2), _values_and_grads(fn, args, 2)
    for a, c in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, c)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _values_and_grads(fn, args, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], first[0])  # per-element outputs: fixed chunks
    for a, c in zip(single[1], first[1]):    # reductions: summation order only
        _assert_close(a, c.double(), torch.float32, "grad")


def test_opcheck_and_compile():
    args = _weights(7, 5, 2, seed=1, requires_grad=True)
    t, lw = _rule(9)
    torch.library.opcheck(torch.ops.csm_ext.head_logz.default, (*args, ALPHA, "tanh", t, lw))
    torch.library.opcheck(torch.ops.csm_ext.head_node_energies.default,
                          (*args, ALPHA, "softplus", t))
    logz = ops.head_logz(*args, ALPHA, "tanh", t, lw)
    torch.library.opcheck(torch.ops.csm_ext.head_logz_backward.default,
                          (torch.randn(7, dtype=torch.float64), logz.detach(),
                           *[a.detach() for a in args], ALPHA, "tanh", t, lw))
    torch.library.opcheck(torch.ops.csm_ext.head_node_energies_backward.default,
                          (torch.randn(7, 9, dtype=torch.float64), *[a.detach() for a in args],
                           ALPHA, "softplus", t))

    def f(z, u, W, b, w):
        return ops.head_logz(z, u, W, b, w, ALPHA, "tanh", t, lw).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_g = torch.autograd.grad(f(*args), args)
    comp_g = torch.autograd.grad(compiled(*args), args)
    for a, c in zip(eager_g, comp_g):
        torch.testing.assert_close(a, c)


def test_bad_input_names_the_argument():
    z, u, W, b, w = _weights(4, 3, 2)
    t, lw = _rule(5)
    with pytest.raises(ValueError, match="nodes"):
        ops.head_logz(z, u, W, b, w, ALPHA, "tanh", t[:1], lw[:1])
    with pytest.raises(ValueError, match="log_weights"):
        ops.head_logz(z, u, W, b, w, ALPHA, "tanh", t, lw[:3])
    with pytest.raises(ValueError, match="nodes"):
        ops.head_logz(z, u, W, b, w, ALPHA, "tanh", t.float(), lw)
    with pytest.raises(ValueError, match="nodes"):
        ops.head_logz(z, u, W, b, w, ALPHA, "tanh", t.clone().requires_grad_(), lw)
    with pytest.raises(ValueError, match="activation"):
        ops.head_node_energies(z, u, W, b, w, ALPHA, "relu", t)
    with pytest.raises(ValueError, match="u must"):
        ops.head_node_energies(z, u[:2], W, b, w, ALPHA, "tanh", t)
    with pytest.raises(ValueError, match="nodes"):  # the C++ checks name it too
        torch.ops.csm_ext.head_logz(z, u, W, b, w, ALPHA, "tanh", t[:1], lw[:1])
    with pytest.raises(ValueError, match="support"):
        quadrature.rule((1.0, 1.0), 5)
    with pytest.raises(ValueError, match="odd"):
        quadrature.rule((0.0, 1.0), 4, "simpson")
    with pytest.raises(ValueError, match="kind"):
        quadrature.rule((0.0, 1.0), 5, "trapezoid-ish")


def test_grid_sampler_draws_the_interpolated_density():
    """KS test of grid samples of a Gaussian energy (fine grid) against the truncated normal."""
    lo, hi = -3.0, 4.0
    t, _ = quadrature.rule((lo, hi), 401, "simpson", torch.float64)
    E = (0.5 * t ** 2).expand(40000, -1)
    x = quadrature.sample_grid(E, t, torch.Generator().manual_seed(0))
    assert x.min() >= lo and x.max() <= hi
    xs = x.sort().values
    Phi = lambda v: 0.5 * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    cdf = (Phi(xs) - Phi(torch.tensor(lo))) / (Phi(torch.tensor(hi)) - Phi(torch.tensor(lo)))
    n = len(xs)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.63 / math.sqrt(n)  # the 1 % critical value
    # very steep cells (huge energy differences) stay finite and inside their cells
    E = torch.tensor([[0.0, 1e3, 2e3], [0.0, -1e3, -2e3]], dtype=torch.float64)
    y = quadrature.sample_grid(E, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.isfinite(y).all() and y[0] < 0.01 and y[1] > 1.99
