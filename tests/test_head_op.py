"""The fused energy-head jets op against its references: values, gradients, edge cases."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_head_args

from csm_ext import ops, reference

ACTS = ops.ACTIVATIONS
LAYERS = (1, 2, 3)
ALPHA = 0.3

# Per-dtype tolerances for fused vs reference (relative to the largest magnitude involved).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def assert_close_scaled(actual, expected, dtype, name=""):
    """allclose with the absolute tolerance scaled by the reference's magnitude."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{name}: {m}")


def jets_and_grads(fn, args, seeds, alpha, act):
    """Outputs of a jets implementation and the gradients of a random projection of them."""
    args = [a.detach().clone().requires_grad_(True) for a in args]
    out = fn(*args, alpha, act)
    weights = [torch.randn(out[0].shape, generator=torch.Generator().manual_seed(s),
                           dtype=torch.float64).to(out[0].dtype) for s in seeds]
    total = sum((o * wt).sum() for o, wt in zip(out, weights))
    grads = torch.autograd.grad(total, args, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in out], grads


@pytest.mark.parametrize("act,L", list(itertools.product(ACTS, LAYERS)))
def test_gradcheck_float64(act, L):
    args = make_head_args(N=6, H=5, L=L, requires_grad=True, seed=L)
    torch.autograd.gradcheck(lambda *a: ops.head_jets(*a, ALPHA, act), args)


@pytest.mark.parametrize("act,L", list(itertools.product(ACTS, LAYERS)))
def test_gradgradcheck_float64(act, L):
    """Second derivatives through the fused op (the backward op's own autograd) match finite
    differences of the fused backward kernel."""
    args = make_head_args(N=4, H=3, L=L, requires_grad=True, seed=10 + L)
    torch.autograd.gradgradcheck(lambda *a: ops.head_jets(*a, ALPHA, act), args)


@pytest.mark.parametrize("act,L", [("softplus", 2), ("tanh", 3), ("silu", 1)])
def test_double_backward_matches_reference(act, L):
    """A gradient penalty through the fused op (grad of a function of dE/dz, dE/dx taken with
    create_graph) gives the reference's gradients for every argument, never a silent None."""
    args = make_head_args(N=23, H=7, L=L, requires_grad=True, seed=3 * L)
    results = []
    for fn in (ops.head_jets, reference.head_jets_ref):
        z, x, u, W, b, w = args
        E, dE, d2E = fn(*args, ALPHA, act)
        gz, gx = torch.autograd.grad(E.sum() + 0.5 * dE.pow(2).sum() - d2E.sum(), (z, x),
                                     create_graph=True)
        penalty = gz.pow(2).sum() + (gx * torch.linspace(-1, 1, len(gx),
                                                         dtype=gx.dtype)).pow(2).sum()
        results.append(torch.autograd.grad(penalty, args, allow_unused=True,
                                           materialize_grads=True))
    for name, a, r in zip("z x u W b w".split(), *results):
        assert a is not None, name
        assert_close_scaled(a, r, torch.float64, name)
    assert results[0][5].abs().max() > 0  # the case: d(penalty)/dw is not zero


def test_third_derivative_is_connected():
    """create_graph through the double backward keeps going (third order, vs the reference)."""
    args = make_head_args(N=5, H=4, L=2, requires_grad=True, seed=2)
    out = []
    for fn in (ops.head_jets, reference.head_jets_ref):
        E, _, _ = fn(*args, ALPHA, "tanh")
        (gz,) = torch.autograd.grad(E.sum(), args[0], create_graph=True)
        (gzz,) = torch.autograd.grad(gz.pow(2).sum(), args[0], create_graph=True)
        out.append(torch.autograd.grad(gzz.pow(2).sum(), args[5]))
    assert_close_scaled(out[0][0], out[1][0], torch.float64, "w")


@pytest.mark.parametrize(
    "act,L,N,H,dtype",
    [(a, L, 37, 13, torch.float64) for a in ACTS for L in LAYERS]
    + [(a, L, 3000, 64, torch.float32) for a in ACTS for L in (2, 3)]
    + [("softplus", 2, 1, 1, torch.float64), ("tanh", 1, 1, 7, torch.float32),
       ("silu", 3, 2049, 33, torch.float32)],
)
def test_fused_matches_reference(act, L, N, H, dtype):
    args = make_head_args(N, H, L, dtype=dtype, seed=N + H)
    out, grads = jets_and_grads(ops.head_jets, args, (1, 2, 3), ALPHA, act)
    # The reference runs in float64 so that float32 errors are the fused kernel's own.
    ref_out, ref_grads = jets_and_grads(reference.head_jets_ref, [a.double() for a in args],
                                        (1, 2, 3), ALPHA, act)
    for name, o, r in zip(("E", "dE", "d2E"), out, ref_out):
        assert o.dtype == dtype
        assert_close_scaled(o.double(), r, dtype, name)
    for name, g, r in zip(("z", "x", "u", "W", "b", "w"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close_scaled(g.double(), r, dtype, f"grad {name}")


@pytest.mark.parametrize("impl", [reference.head_jets_eager, reference.head_jets_func])
@pytest.mark.parametrize("act", ACTS)
def test_competitor_implementations_agree(impl, act):
    """The benchmark's competitors compute the same thing (float64)."""
    args = make_head_args(19, 9, 3, seed=3)
    out, grads = jets_and_grads(impl, args, (4, 5, 6), ALPHA, act)
    ref_out, ref_grads = jets_and_grads(reference.head_jets_ref, args, (4, 5, 6), ALPHA, act)
    for o, r in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        assert_close_scaled(o, r, torch.float64)


def test_empty_batch():
    args = make_head_args(0, 8, 2, requires_grad=True)
    E, dE, d2E = ops.head_jets(*args, ALPHA, "softplus")
    assert E.shape == dE.shape == d2E.shape == (0,)
    (E.sum() + dE.sum() + d2E.sum()).backward()
    z, x, u, W, b, w = args
    assert z.grad.shape == (0, 8) and x.grad.shape == (0,)
    for p in (u, W, b, w):
        assert torch.count_nonzero(p.grad) == 0


def test_non_contiguous_inputs():
    N, H, L = 41, 11, 3
    z_big = torch.randn(H, 2 * N, dtype=torch.float64)
    z = z_big.t()[::2]  # (N, H), strided in both dimensions
    x = torch.randn(3 * N, dtype=torch.float64)[::3]
    W = torch.randn(L - 1, H, H, dtype=torch.float64).transpose(1, 2) / H ** 0.5
    _, _, u, _, b, w = make_head_args(N, H, L)
    assert not z.is_contiguous() and not x.is_contiguous() and not W.is_contiguous()
    args = (z, x, u, W, b, w)
    out, grads = jets_and_grads(ops.head_jets, args, (7, 8, 9), ALPHA, "silu")
    ref_out, ref_grads = jets_and_grads(reference.head_jets_ref, args, (7, 8, 9), ALPHA, "silu")
    for o, r in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        assert_close_scaled(o, r, torch.float64)


def test_nan_in_nan_out():
    z, x, u, W, b, w = make_head_args(20, 16, 2, dtype=torch.float32)
    x[3] = float("nan")
    z[7, 2] = float("nan")
    for act in ACTS:
        E, dE, d2E = ops.head_jets(z, x, u, W, b, w, ALPHA, act)
        for t in (E, dE, d2E):
            assert torch.isnan(t[3]) and torch.isnan(t[7])
            mask = torch.ones(20, dtype=torch.bool)
            mask[[3, 7]] = False
            assert torch.isfinite(t[mask]).all()


def test_extreme_preactivations_stay_finite():
    """Large |a| must not overflow (stable softplus/sigmoid/tanh forms)."""
    z, x, u, W, b, w = make_head_args(8, 4, 2)
    z = z * 1e3
    for act in ACTS:
        out, grads = jets_and_grads(ops.head_jets, (z, x, u, W, b, w), (1, 2, 3), ALPHA, act)
        assert all(torch.isfinite(t).all() for t in list(out) + list(grads))


@pytest.mark.parametrize("H", [32, 64])  # the BLAS tile products, and the op's own
def test_backward_is_deterministic_and_thread_count_invariant(H):
    args = make_head_args(5000, H, 3, dtype=torch.float32, seed=11)
    first = jets_and_grads(ops.head_jets, args, (1, 2, 3), ALPHA, "softplus")
    second = jets_and_grads(ops.head_jets, args, (1, 2, 3), ALPHA, "softplus")
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = jets_and_grads(ops.head_jets, args, (1, 2, 3), ALPHA, "softplus")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first[0], single[0]):  # per-element outputs: bitwise equal
        assert torch.equal(a, b)
    for a, b in zip(first[1], single[1]):  # reductions: only the summation order differs
        assert_close_scaled(a.double(), b.double(), torch.float32)


def test_opcheck_head_jets():
    for act, L in [("softplus", 1), ("tanh", 2), ("silu", 3)]:
        args = make_head_args(9, 6, L, requires_grad=True, seed=L)
        torch.library.opcheck(torch.ops.csm_ext.head_jets.default, (*args, ALPHA, act))
        plain = make_head_args(9, 6, L, dtype=torch.float32, seed=L)
        torch.library.opcheck(torch.ops.csm_ext.head_jets.default, (*plain, 0.0, act))


def test_opcheck_head_jets_backward():
    args = make_head_args(9, 6, 2, seed=5)
    grads = tuple(torch.randn(9, dtype=torch.float64) for _ in range(3))
    torch.library.opcheck(torch.ops.csm_ext.head_jets_backward.default,
                          (*grads, *args, ALPHA, "tanh"))
    # with inputs that require grad: the backward op's own autograd (second derivatives)
    args = make_head_args(9, 6, 2, seed=6, requires_grad=True)
    grads = tuple(torch.randn(9, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.csm_ext.head_jets_backward.default,
                          (*grads, *args, ALPHA, "softplus"))


@pytest.mark.parametrize("N", [50, 700])  # the small-call path and the BLAS path
def test_backward_without_weight_gradients(N):
    """weight_grads=False (a frozen head) gives the same z and x gradients and skips the
    weights'; through autograd, a head whose weights need no grad takes that path."""
    args = make_head_args(N, 16, 3, seed=21)
    grads = tuple(torch.randn(N, dtype=torch.float64) for _ in range(3))
    full = torch.ops.csm_ext.head_jets_backward(*grads, *args, ALPHA, "silu")
    part = torch.ops.csm_ext.head_jets_backward(*grads, *args, ALPHA, "silu", False)
    torch.testing.assert_close(part[0], full[0])
    torch.testing.assert_close(part[1], full[1])
    assert all(not t.any() for t in part[2:])
    assert full[3].abs().sum() > 0
    torch.library.opcheck(torch.ops.csm_ext.head_jets_backward.default,
                          (*grads, *args, ALPHA, "silu", False))

    z, x = (a.clone().requires_grad_(True) for a in args[:2])
    E, dE, d2E = ops.head_jets(z, x, *args[2:], ALPHA, "silu")
    gz, gx = torch.autograd.grad((E * grads[0] + dE * grads[1] + d2E * grads[2]).sum(), (z, x))
    torch.testing.assert_close(gz, full[0])
    torch.testing.assert_close(gx, full[1])


@pytest.mark.parametrize("N,H,L", [(1, 64, 2), (2, 64, 2), (255, 64, 2), (256, 64, 2),
                                   (257, 64, 2), (511, 64, 2), (512, 64, 2), (513, 64, 2),
                                   (1000, 64, 2), (5, 16, 3), (7, 32, 2), (131, 128, 2),
                                   (3, 13, 2), (300, 24, 3)])
def test_small_and_boundary_sizes_match_reference(N, H, L):
    """Sizes around the one-thread threshold and the tile sizes, and every width the small-call
    products specialise (16, 32, 64, 128) or not (13, 24), row counts not a multiple of 4."""
    args = make_head_args(N, H, L, seed=N)
    fused = jets_and_grads(ops.head_jets, args, (1, 2, 3), ALPHA, "softplus")
    ref = jets_and_grads(reference.head_jets_ref, args, (1, 2, 3), ALPHA, "softplus")
    for a, b in zip(fused[0] + list(fused[1]), ref[0] + list(ref[1])):
        torch.testing.assert_close(a, b)


def test_dynamic_shapes_compile_once():
    """The fake kernels record shape relations with torch._check, so a dynamic-shape graph is
    not specialised to one N: a second size runs without recompiling."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss(z, x, u, W, b, w):
        _, dE, d2E = ops.head_jets(z, x, u, W, b, w, ALPHA, "tanh")
        return (0.5 * dE * dE - d2E).sum()

    fn = torch.compile(loss, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for N in (37, 53, 90):  # (sizes 0 and 1 are specialised by design)
        args = make_head_args(N, 8, 2, dtype=torch.float32, seed=N, requires_grad=True)
        out = fn(*args)
        out.backward()
        frames.append(counter.frame_count)
        torch.testing.assert_close(out, loss(*args))
    assert frames[0] >= 1 and frames[-1] == frames[0], f"recompiled: frames {frames}"
