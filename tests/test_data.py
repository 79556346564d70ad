"""Data: toy densities (normalised, consistent with their samplers), Gaussian conditionals,
image loaders on small files written here, preprocessing, and clear errors."""
import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from csm_ext.data import (TOYS, CorrelatedGaussian, ImageData, Preprocess, get_toy, load_cifar10,
                          load_digits8, load_idx, load_images, load_mnist5k, load_mnist_idx,
                          mnist5k_path)


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_density_normalised_and_matches_samples(name):
    toy = get_toy(name)
    lo, hi = (-14.0, 14.0) if name == "funnel" else toy.range
    lo, hi = lo - 0.5, hi + 0.5
    m = 161 if name != "funnel" else 801
    g = torch.linspace(lo, hi, m, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    p = toy.log_prob(pts).exp()
    mass = float(p.sum() * (g[1] - g[0]) ** 2)
    assert abs(mass - 1) < 0.02, mass
    # the sampler draws from the same density: mean log-density of samples = -entropy (≈ grid)
    x = toy.sample(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (4000, 2) and torch.isfinite(toy.log_prob(x)).all()
    ent_grid = -float((p * p.clamp_min(1e-300).log()).sum() * (g[1] - g[0]) ** 2)
    ent_mc = -float(toy.log_prob(x).mean())
    assert abs(ent_grid - ent_mc) < 0.1, (ent_grid, ent_mc)


def test_checkerboard_unsmoothed_and_errors():
    cb = get_toy("checkerboard", sigma=0.0)
    x = cb.sample(100, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cb.log_prob(x), torch.full((100,), -math.log(8)))
    assert cb.log_prob(torch.tensor([[-1.5, -0.5]])).item() == -math.inf
    with pytest.raises(ValueError, match="unknown toy"):
        get_toy("moons")
    with pytest.raises(ValueError, match="x must"):
        cb.log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="n must"):
        cb.sample(-1)


def test_eight_gaussians_sampling_proportions():
    toy = get_toy("8gaussians")
    k = toy.nearest_mode(toy.sample(8000, generator=torch.Generator().manual_seed(1)))
    frac = torch.bincount(k, minlength=8).double() / 8000
    assert (frac - 0.125).abs().max() < 0.02


def test_correlated_gaussian_conditionals():
    gs = CorrelatedGaussian(dim=6, seed=0)
    x = gs.sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(torch.cov(x.T), gs.cov, atol=0.15)
    # conditional score = d/dx_d of log p(x_<=d) marginal; check via autograd of the marginal density
    xs = x[:5].clone().requires_grad_(True)
    s = gs.conditional_scores(xs)
    for d in range(6):
        cov = gs.cov[: d + 1, : d + 1]
        lp = torch.distributions.MultivariateNormal(torch.zeros(d + 1, dtype=torch.float64), cov)
        g, = torch.autograd.grad(lp.log_prob(xs[:, : d + 1]).sum(), xs)
        assert torch.allclose(g[:, d], s[:, d].detach(), atol=1e-8)
    # optimum of the CSM loss = E[sum_d 1/2 s_d^2 - 1/v_d] = -1/2 sum 1/v_d
    s = gs.conditional_scores(x)
    mc = float((0.5 * s ** 2 - 1 / gs.variances).sum(1).mean())
    assert abs(mc - gs.csm_optimum) < 0.05 * abs(gs.csm_optimum)


# ---------------------------------------------------------------- image loaders on written files


def _write_idx(path, arr, gz):
    codes = {np.dtype(np.uint8): 0x08}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader(tmp_path, gz):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, (7,), dtype=np.uint8)
    suf = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suf}", x, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suf}", y, gz)
    d = load_mnist_idx(str(tmp_path), train=True, name="fashion-mnist")
    assert d.images.shape == (7, 1, 28, 28) and d.images.dtype == torch.uint8
    assert np.array_equal(d.images[:, 0].numpy(), x) and np.array_equal(d.labels.numpy(), y)
    assert d.name == "fashion-mnist" and d.levels == 256
    d2 = load_images("mnist", root=str(tmp_path))
    assert torch.equal(d2.images, d.images)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist_idx(str(tmp_path), train=False)


def test_idx_malformed(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x03garbage")
    with pytest.raises(ValueError, match=str(bad)):
        load_idx(str(bad))
    trunc = tmp_path / "trunc-idx"
    trunc.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="trunc-idx"):
        load_idx(str(trunc))
    labels = tmp_path / "labels"
    _write_idx(labels, np.zeros(3, np.uint8), False)
    imgs = tmp_path / "imgs"
    _write_idx(imgs, np.zeros((4, 2, 2), np.uint8), False)
    with pytest.raises(ValueError, match="labels"):
        load_idx(str(imgs), str(labels))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_idx(str(tmp_path / "nowhere"))


def test_cifar10_loader(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    for nm in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        batches[nm] = x
        with open(tmp_path / nm, "wb") as f:
            pickle.dump({b"data": x, b"labels": [1, 2, 3]}, f)
    tr = load_cifar10(str(tmp_path), train=True)
    te = load_images("cifar10", root=str(tmp_path), train=False)
    assert tr.images.shape == (15, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    assert np.array_equal(te.images.reshape(3, -1).numpy(), batches["test_batch"])
    assert te.labels.tolist() == [1, 2, 3]
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(str(tmp_path), train=False)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(str(tmp_path), train=True)
    with pytest.raises(ValueError, match="root"):
        load_images("cifar10")


def test_mnist5k_embedded_and_csv_errors(tmp_path):
    d = load_mnist5k()
    assert mnist5k_path().endswith("mnist_5k.csv.gz")
    assert d.images.shape == (5000, 1, 28, 28) and d.levels == 256
    assert torch.bincount(d.labels).tolist() == [500] * 10
    assert 0.1 < d.images.float().mean() / 255 < 0.2  # MNIST mean intensity ≈ 0.13
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="bad.csv"):
        load_mnist5k(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_mnist5k(str(tmp_path / "missing.csv"))


def test_digits_and_split():
    d = load_digits8()
    assert d.images.shape == (1797, 1, 8, 8) and d.levels == 17 and int(d.images.max()) == 16
    tr, te = d.split(0.2, seed=3)
    tr2, te2 = d.split(0.2, seed=3)
    assert len(te) == round(1797 * 0.2) and len(tr) + len(te) == 1797
    assert torch.equal(te.images, te2.images) and torch.equal(tr.labels, tr2.labels)
    _, te3 = d.split(0.2, seed=4)
    assert not torch.equal(te.images, te3.images)
    with pytest.raises(ValueError, match="test_fraction"):
        d.split(1.5)
    with pytest.raises(ValueError, match="unknown image data"):
        load_images("svhn")


def test_preprocess_ranges_noise_and_inverse():
    v = torch.randint(0, 256, (1000, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    p = Preprocess(sigma=0.0, range=(-1, 1))
    y = p(v, generator=g)
    assert y.shape == v.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() < 1 and p.data_range == (-1.0, 1.0)
    # dequantisation keeps the integer: floor(u * levels) == v
    u = p.inverse(y)
    assert torch.equal((u * 256).floor().long().clamp(max=255), v.long())
    pl = Preprocess(sigma=0.0, logit=0.05)
    yl = pl(v, generator=g)
    lo, hi = pl.data_range
    assert yl.min() >= lo - 1e-5 and yl.max() <= hi + 1e-5
    assert torch.allclose(pl.inverse(yl), pl.to_unit(v, torch.Generator().manual_seed(0)), atol=1e-2)
    pn = Preprocess(sigma=0.1, dequantize=False)
    z = pn(torch.full((20000,), 128, dtype=torch.uint8), generator=g)
    assert abs(float(z.std()) - 0.1) < 0.005 and abs(float(z.mean()) - (128.5 / 256 * 2 - 1)) < 0.005
    assert torch.equal(pn(v, noise=False), pn(v, noise=False))
    for kw, arg in [(dict(sigma=-1), "sigma"), (dict(logit=0.7), "logit"), (dict(range=(1, 0)), "range"),
                    (dict(levels=1), "levels")]:
        with pytest.raises(ValueError, match=arg):
            Preprocess(**kw)


def test_imagedata_basics():
    d = ImageData(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5), 256, "x")
    assert d.shape == (1, 2, 2) and len(d) == 5 and len(d.subset(torch.tensor([0, 2]))) == 2
