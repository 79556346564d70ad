"""MADE-CSM: the autoregressive property, backends, config round trip, Gaussian consistency
(learned scores = true conditional scores; loss at the CSM optimum) and 8-gaussians sampling."""
import time

import pytest
import torch

from conftest import changed, fit
from csm_ext.data import CorrelatedGaussian, get_toy
from csm_ext.models import MADECSM
from csm_ext.sampling import initial_points, step_schedule


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread: their ops are microseconds long, and waking a
    thread pool for each costs more (far more when other processes share the cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("order", [None, "random", [3, 0, 6, 1, 5, 2, 4]])
@pytest.mark.parametrize("hidden,direct", [((32, 24), False), ((16,), True), ((), False)])
def test_autoregressive_property(order, hidden, direct):
    D = 7
    m = MADECSM(D, hidden_sizes=hidden, context_dim=3, head_hidden=8, order=order, direct=direct,
                seed=1).double()
    with torch.no_grad():  # make the biases and weights generic
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pos = torch.empty(D, dtype=torch.long)
    pos[m.order] = torch.arange(D)
    assert torch.equal(m.degrees, pos + 1)
    x = torch.randn(4, D, dtype=torch.float64)
    c0, E0 = m.context(x), m.energy(x)
    for j in range(D):
        xp = x.clone()
        xp[:, j] += torch.randn(4, dtype=torch.float64)
        c1, E1 = m.context(xp), m.energy(xp)
        for d in range(D):
            if pos[d] <= pos[j]:
                assert not changed(c1[:, d], c0[:, d]).any(), (j, d)
            if pos[d] < pos[j]:
                assert not changed(E1[:, d], E0[:, d]).any(), (j, d)
        if pos[j] < D - 1:  # not vacuous: the next dimension in the order does see x_j
            nxt = m.order[pos[j] + 1]
            assert not torch.allclose(c0[:, nxt], c1[:, nxt])
    # the first dimension's context is biases only
    assert torch.allclose(c0[:, m.order[0]], c0[:1, m.order[0]].expand(4, -1))
    for d in range(D):
        assert torch.allclose(m.context_at(x, d), c0[:, d])


def test_backends_agree_and_config_round_trip():
    torch.manual_seed(0)
    m = MADECSM(10, hidden_sizes=(32,), context_dim=4, head_hidden=16, order="random", direct=True)
    x = torch.randn(8, 10)
    assert m.backend == "fused"
    l_f = m.loss(x)
    g_f = torch.autograd.grad(l_f, list(m.parameters()))
    m.backend = "autograd"
    assert m.head.backend == "autograd" and m.config["backend"] == "autograd"
    l_a = m.loss(x)
    g_a = torch.autograd.grad(l_a, list(m.parameters()))
    assert torch.allclose(l_f, l_a, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_f, g_a):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    m2 = MADECSM.from_config(m.config)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.order, m.order) and torch.allclose(m2.loss(x), l_a)
    assert m.loss(x, "none").shape == (8,) and torch.allclose(m(x, "sum"), m.loss(x, "sum"))
    E, dE, d2E = m.jets(x)
    assert E.shape == dE.shape == d2E.shape == (8, 10) and torch.equal(m.score(x), -dE)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="dim"):
        MADECSM(0)
    with pytest.raises(ValueError, match="order"):
        MADECSM(3, order=[0, 0, 1])
    with pytest.raises(ValueError, match="order"):
        MADECSM(3, order="zigzag")
    with pytest.raises(ValueError, match="hidden_sizes"):
        MADECSM(3, hidden_sizes=(0,))
    with pytest.raises(ValueError, match="context_dim"):
        MADECSM(3, context_dim=0)
    with pytest.raises(ValueError, match="backend"):
        MADECSM(3, backend="magic")
    m = MADECSM(3, hidden_sizes=(8,), context_dim=2, head_hidden=4)
    with pytest.raises(ValueError, match="x must"):
        m.loss(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="init"):
        m.sample(2, init="sideways", progress=False)
    with pytest.raises(ValueError, match="init"):
        m.sample(2, init=torch.zeros(3, 3), progress=False)
    with pytest.raises(ValueError, match="clip"):
        m.sample(2, clip=(1, 0), progress=False)
    with pytest.raises(ValueError, match="steps"):
        m.sample(2, steps=0, progress=False)
    with pytest.raises(ValueError, match="anneal"):
        m.sample(2, anneal=0.5, progress=False)


def test_sample_shapes_clip_init_and_determinism():
    m = MADECSM(5, hidden_sizes=(16,), context_dim=2, head_hidden=8)
    x = m.sample(6, steps=3, clip=(-1, 1), progress=False, generator=torch.Generator().manual_seed(0))
    y = m.sample(6, steps=3, clip=(-1, 1), progress=False, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 5) and torch.equal(x, y) and x.abs().max() <= 1
    z = m.sample(6, steps=3, init=torch.full((6, 5), 0.5), progress=False, denoise=0.1)
    assert torch.isfinite(z).all()
    assert m.sample(0, steps=2, progress=False).shape == (0, 5)
    eps = step_schedule(5, 0.01, anneal=100)
    assert abs(eps[0] - 1.0) < 1e-9 and abs(eps[-1] - 0.01) < 1e-12 and eps == sorted(eps, reverse=True)
    u = initial_points(1000, 2, None, (2.0, 3.0), None, torch.float32, "cpu")
    assert u.min() >= 2 and u.max() <= 3


def test_langevin_samples_a_known_head_distribution():
    """With a head whose energy is the confinement alone, q(x) = N(0, 1/alpha)."""
    m = MADECSM(3, hidden_sizes=(8,), context_dim=2, head_hidden=4, confine=4.0)
    with torch.no_grad():
        m.head.w.zero_()
    x = m.sample(4000, steps=300, step_size=0.01, anneal=10, progress=False,
                 generator=torch.Generator().manual_seed(0))
    assert (x.mean(0).abs() < 0.05).all() and ((x.std(0) - 0.5).abs() < 0.03).all()
    # temperature T samples q^(1/T) = N(0, T/alpha)
    x = m.sample(4000, steps=300, step_size=0.005, anneal=10, progress=False, temperature=0.25,
                 generator=torch.Generator().manual_seed(1))
    assert ((x.std(0) - 0.25).abs() < 0.02).all()
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=0.0, progress=False)


def test_gaussian_consistency(one_thread):
    """Trained on a correlated 6-D Gaussian, the learned conditional scores match the true ones on
    held-out points (correlation > 0.95) and the test CSM loss is within 10% of -1/2 sum 1/v_d."""
    t0 = time.time()
    gs = CorrelatedGaussian(dim=6, seed=0)
    g = torch.Generator().manual_seed(1)
    x_train, x_test = gs.sample(20000, generator=g), gs.sample(5000, generator=g)
    torch.manual_seed(0)
    m = MADECSM(6, hidden_sizes=(64, 64), context_dim=8, head_hidden=32, head_layers=2, confine=0.0)

    def batch():
        return x_train[torch.randint(0, len(x_train), (256,), generator=g)]

    fit(m, batch, steps=1200, lr=3e-3)
    with torch.no_grad():
        test_loss = float(m.loss(x_test))
        s = m.score(x_test).double()
    s_true = gs.conditional_scores(x_test.double())
    corr = [float(torch.corrcoef(torch.stack([s[:, d], s_true[:, d]]))[0, 1]) for d in range(6)]
    opt = gs.csm_optimum
    print(f"gaussian: test loss {test_loss:.4f} optimum {opt:.4f} (ratio {test_loss / opt:.4f}); "
          f"score correlations {[round(c, 4) for c in corr]}; {time.time() - t0:.1f}s")
    assert min(corr) > 0.95
    assert abs(test_loss - opt) < 0.1 * abs(opt)


def test_eight_gaussians_langevin_mode_proportions(one_thread):
    """Langevin and grid samples from MADE-CSM trained on 8 gaussians hit all 8 modes in equal
    shares."""
    toy = get_toy("8gaussians")
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    m = MADECSM(2, hidden_sizes=(64, 64), context_dim=8, head_hidden=32, head_layers=3)
    fit(m, lambda: toy.sample(256, generator=g), steps=3000, lr=3e-3)
    x = m.sample(4000, steps=500, step_size=0.01, anneal=10, clip=toy.range, generator=g,
                 progress=False)
    k = toy.nearest_mode(x)
    frac = torch.bincount(k, minlength=8).double() / len(x)
    near = (x.double() - toy.centers[k]).norm(dim=1) < 3 * toy.std
    print(f"8gaussians: mode fractions {[round(f, 3) for f in frac.tolist()]}, "
          f"within 3 std of a center {float(near.double().mean()):.3f}")
    assert (frac - 0.125).abs().max() < 0.035
    assert near.double().mean() > 0.95
    # the exact grid sampler on the same model: the same equal shares, no chain to mix
    m.support = toy.range
    x = m.sample(4000, method="grid", generator=g, progress=False)
    frac = torch.bincount(toy.nearest_mode(x), minlength=8).double() / len(x)
    print(f"8gaussians (grid sampler): mode fractions {[round(f, 3) for f in frac.tolist()]}")
    assert (frac - 0.125).abs().max() < 0.035
