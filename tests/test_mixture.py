"""Maximum-likelihood baselines (MADE-Gaussian / MADE-MoG, PixelCNN++ with logistic mixtures):
proper densities on the support, the analytic single-Gaussian value, the autoregressive
property of the shared backbones, exact ancestral sampling, the trainer / checkpoints / CLI,
and the fidelity benchmark's KL estimate and quick mode."""
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import changed
from csm_ext.models import MADECSM, MADEMixture, PixelCNNppMixture
from csm_ext.models.common import ARModel
from csm_ext.models.mixture import mixture_log_prob, mixture_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _generic(m, scale=0.3):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


def _grid_mass(log_prob, lo, hi, n=401):
    """∫∫ exp(log_prob) over [lo, hi]² by the composite trapezoid rule (float64)."""
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    X, Y = torch.meshgrid(t, t, indexing="ij")
    with torch.no_grad():
        p = log_prob(torch.stack([X.reshape(-1), Y.reshape(-1)], 1)).exp().view(n, n)
    w = torch.full((n,), (hi - lo) / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = w[0] / 2
    return float((w[:, None] * w[None, :] * p).sum())


def _set_gaussian(m, mu, log_s):
    """A MADEMixture with K = 1 whose conditionals are fixed N(mu_d, exp(log_s_d)²)."""
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        b = m.out.bias.view(m.dim, 3)
        b[:, 1] = torch.as_tensor(mu, dtype=b.dtype)
        b[:, 2] = torch.as_tensor(log_s, dtype=b.dtype)
    return m


def test_shared_base_and_backbone():
    assert issubclass(MADEMixture, ARModel) and issubclass(MADECSM, ARModel)
    from csm_ext.models.made import MADENet
    from csm_ext.models.pixelcnnpp import PixelCNNppCSM

    assert issubclass(MADEMixture, MADENet) and issubclass(MADECSM, MADENet)
    assert PixelCNNppMixture._sweep is PixelCNNppCSM._sweep  # the same function, not a copy
    m = MADEMixture(3, (8,), components=2, order="random", seed=3, support=(-2, 2))
    assert MADEMixture.from_config(m.config).config == m.config


@pytest.mark.parametrize("K", [1, 4])
def test_made_mixture_integrates_to_one(K):
    torch.manual_seed(K)
    m = _generic(MADEMixture(2, (16, 16), components=K, support=(-3.0, 3.0)).double(), 0.1)
    assert abs(_grid_mass(m.log_prob, -3.0, 3.0) - 1.0) < 2e-3


def test_pixelcnnpp_mixture_integrates_to_one():
    torch.manual_seed(0)
    m = _generic(PixelCNNppMixture(1, 1, 2, nr_resnet=1, nr_filters=4, components=3,
                                   support=(-2.5, 2.5)).double(), 0.2).eval()
    assert abs(_grid_mass(lambda x: m.log_prob(x), -2.5, 2.5) - 1.0) < 2e-3


def test_single_gaussian_equals_the_analytic_value():
    mu, log_s = torch.tensor([0.3, -0.5]), torch.tensor([-0.2, 0.4])
    x = torch.tensor([[0.1, 0.2], [-1.0, 1.5], [2.0, -2.5]], dtype=torch.float64)
    normal = torch.distributions.Normal(mu.double(), log_s.double().exp())
    m = _set_gaussian(MADEMixture(2, (8,), components=1).double(), mu, log_s)
    want = normal.log_prob(x).sum(1)
    assert torch.allclose(m.log_prob(x), want, atol=1e-12)  # on R without a support
    lo, hi = -3.0, 3.0
    m.support = (lo, hi)  # truncated to the support: minus log of each component's mass
    mass = normal.cdf(torch.tensor(hi, dtype=torch.float64)) - normal.cdf(
        torch.tensor(lo, dtype=torch.float64))
    assert torch.allclose(m.log_prob(x), want - mass.log().sum(), atol=1e-12)
    assert torch.allclose(m.bits_per_dim(x), -(want - mass.log().sum()) / (2 * math.log(2)))
    assert torch.allclose(m.loss(x, reduction="none"), -(want - mass.log().sum()))


def test_logistic_density_and_far_truncation():
    mu, s = 0.4, 0.7
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    params = torch.tensor([0.0, mu, math.log(s)], dtype=torch.float64).expand(7, 3)
    z = (x - mu) / s
    want = -z - math.log(s) - 2 * torch.log1p(torch.exp(-z))
    assert torch.allclose(mixture_log_prob(params, x, "logistic"), want, atol=1e-12)
    # A component far below the support (where F(hi) − F(lo) is 1 − 1 in float32) still gives a
    # finite, normalised truncated density, and samples inside the support.
    far = torch.tensor([0.0, -5.0, math.log(0.5)]).expand(4001, 3)
    t = torch.linspace(-1, 1, 4001)
    for family in ("gaussian", "logistic"):
        p = mixture_log_prob(far, t, family, (-1.0, 1.0)).double().exp()
        assert torch.isfinite(p).all()
        assert abs(float(torch.trapezoid(p, t.double())) - 1.0) < 1e-3, family
        xs = mixture_sample(far[:2000], family, (-1.0, 1.0), torch.Generator().manual_seed(0))
        mean = float(torch.trapezoid(p * t.double(), t.double()))
        assert ((xs >= -1) & (xs <= 1)).all() and abs(float(xs.mean()) - mean) < 0.05, family


def test_made_mixture_autoregressive_property():
    D = 6
    torch.manual_seed(0)
    m = _generic(MADEMixture(D, (16, 12), components=2, order=[3, 0, 5, 1, 4, 2], direct=True,
                             seed=1).double())
    pos = torch.empty(D, dtype=torch.long)
    pos[m.order] = torch.arange(D)
    x = torch.randn(3, D, dtype=torch.float64)
    p0, l0 = m.params(x), m.log_prob_elements(x)
    for j in range(D):
        xp = x.clone()
        xp[:, j] += 1.0
        p1, l1 = m.params(xp), m.log_prob_elements(xp)
        for d in range(D):
            if pos[d] <= pos[j]:
                assert not changed(p1[:, d], p0[:, d]).any(), (j, d)
            if pos[d] < pos[j]:
                assert not changed(l1[:, d], l0[:, d]).any(), (j, d)
        if pos[j] < D - 1:
            assert changed(p1[:, m.order[pos[j] + 1]], p0[:, m.order[pos[j] + 1]]).any()


def test_pixelcnnpp_mixture_autoregressive_property():
    C, H, W = 3, 3, 3
    D = C * H * W
    torch.manual_seed(0)
    m = _generic(PixelCNNppMixture(C, H, W, nr_resnet=1, nr_filters=8, components=2).double(),
                 0.1).eval()
    pos = (torch.arange(H * W).view(1, H, W) * C + torch.arange(C).view(C, 1, 1)).reshape(-1)
    x = torch.randn(1, D, dtype=torch.float64)
    xp = x.repeat(D, 1)
    xp[torch.arange(D), torch.arange(D)] += 1.0
    with torch.no_grad():
        p0, p1 = m.params(x.repeat(D, 1)), m.params(xp)
    moved = changed(p1, p0).any(-1)  # (D perturbations, D elements)
    for b in range(D):
        assert not moved[b][pos <= pos[b]].any(), b
        if pos[b] < D - 1:
            assert moved[b][pos == pos[b] + 1].all(), b


def test_ancestral_samples_follow_the_truncated_gaussian():
    mu, log_s = [0.5, -0.2], [math.log(0.8), math.log(1.5)]
    m = _set_gaussian(MADEMixture(2, (4,), components=1, support=(-1.0, 2.0)), mu, log_s)
    x = m.sample(20000, generator=torch.Generator().manual_seed(0), progress=False).double()
    assert x.min() >= -1.0 and x.max() <= 2.0
    for d in range(2):
        n = torch.distributions.Normal(mu[d], math.exp(log_s[d]))
        a, b = n.cdf(torch.tensor(-1.0)), n.cdf(torch.tensor(2.0))
        xs = x[:, d].sort().values
        cdf = (n.cdf(xs.float()).double() - a) / (b - a)
        ks = float((cdf - torch.arange(1, len(xs) + 1, dtype=torch.float64) / len(xs)).abs().max())
        assert ks < 0.015, (d, ks)  # the 1% KS critical value at n = 20000 is 0.0115
    pc = PixelCNNppMixture(1, 2, 2, nr_resnet=1, nr_filters=4, components=2, support=(-2, 2))
    s = pc.sample(3, progress=False, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 1, 2, 2) and pc.training


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="components"):
        MADEMixture(2, components=0)
    m = MADEMixture(2, (4,), components=2, support=(-1, 1))
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=0.5, progress=False)
    with pytest.raises(ValueError, match="method"):
        m.sample(2, method="langevin", progress=False)
    with pytest.raises(ValueError, match="objective"):
        m.objective = "csm"
    with pytest.raises(ValueError, match="support"):
        m.log_prob(torch.full((1, 2), 3.0))
    with pytest.raises(ValueError, match="shape"):
        m.log_prob(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="channels"):
        PixelCNNppMixture(0, 2, 2)


def test_trainer_checkpoint_and_cli(tmp_path):
    from csm_ext.cli import main
    from csm_ext.data import ToySource
    from csm_ext.train import TrainConfig, load_checkpoint, train

    torch.manual_seed(0)
    src = ToySource("8gaussians", n_test=200)
    m = MADEMixture(2, (16,), components=3, support=src.support)
    with torch.no_grad():
        before = float(m.loss(src.test))
    cfg = TrainConfig(steps=40, batch_size=128, lr=1e-2, n_samples=50, progress=False,
                      out_dir=str(tmp_path / "run"))
    summary = train(m, src, cfg)
    assert summary["test_loss"] < before
    assert summary["test_likelihood"]["quadrature_max_abs"] == 0.0
    m2, ck = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ck["model_name"] == "made-mog" and isinstance(m2, MADEMixture)
    assert torch.allclose(m2.log_prob(src.test), m.log_prob(src.test))
    out = tmp_path / "cli"
    assert main(["train", "--model", "made-mog", "--components", "1", "--data", "toy:rings",
                 "--hidden", "8", "--steps", "3", "--n-samples", "10", "--no-progress",
                 "--out", str(out)]) == 0
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", "5", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["train", "--model", "made-mog", "--objective", "csm", "--data", "toy:rings",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["train", "--model", "made", "--components", "3", "--data", "toy:rings",
                 "--out", str(tmp_path / "bad2")]) == 2


def test_kl_estimate_equals_the_analytic_kl_of_two_gaussians():
    import bench_fidelity

    mu_q, s_q = torch.tensor([0.5, -0.3]), torch.tensor([1.2, 0.8])
    q = _set_gaussian(MADEMixture(2, (4,), components=1, support=(-40.0, 40.0)).double(),
                      mu_q, s_q.log())
    p = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64),
                                   torch.ones(2, dtype=torch.float64))
    x = p.sample((20000,))
    res = bench_fidelity.kl_estimate(lambda z: p.log_prob(z).sum(1), q.log_prob, x,
                                     support=q.support)
    want = float((s_q.log() + (1 + mu_q ** 2) / (2 * s_q ** 2) - 0.5).sum())
    assert res["n"] == 20000 and res["outside"] == 0.0
    assert abs(res["kl"] - want) < 4 * res["stderr"] and res["stderr"] < 0.01, (res, want)
    # Restricted to a box: samples outside are dropped and p renormalised on it.
    r2 = bench_fidelity.kl_estimate(lambda z: p.log_prob(z).sum(1), q.log_prob, x,
                                    support=(-1.0, 40.0))
    assert 0.2 < r2["outside"] < 0.35 and math.isfinite(r2["kl"])


def test_bench_fidelity_quick(tmp_path):
    import bench_fidelity

    res = bench_fidelity.main(["--quick", "--toys", "8gaussians", "--data", "digits",
                               "--pcnn-sigmas", "", "--figures", str(tmp_path),
                               "--out", str(tmp_path / "f.json")])
    toys = res["toys"]
    assert [r["model"] for r in toys] == list(bench_fidelity.MADE_ROWS)
    assert all(math.isfinite(r["kl"]) and r["n_kl"] >= 1000 for r in toys)
    assert (tmp_path / "fidelity_toy_8gaussians.png").stat().st_size > 0
    imgs = res["images"]
    assert [r["model"] for r in imgs] == list(bench_fidelity.MADE_ROWS)
    assert all(0 < r["bits_per_dim"] < 10 for r in imgs)
    assert (tmp_path / "fidelity_mnist_sigma0.5.png").stat().st_size > 0
    assert "| 8gaussians |" in res["markdown"]


@pytest.mark.slow
def test_bench_fidelity_quick_with_pixelcnnpp(tmp_path):
    import bench_fidelity

    res = bench_fidelity.main(["--quick", "--sections", "mnist", "--data", "digits",
                               "--figures", str(tmp_path), "--out", str(tmp_path / "f.json")])
    assert [r["model"] for r in res["images"]][-2:] == list(bench_fidelity.PCNN_ROWS)
