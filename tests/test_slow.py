"""Slow statistical tests (``bash scripts/test.sh -m slow``; minutes on 2 CPU cores).

Longer versions of the default suite's consistency checks: larger models, more dimensions, more
steps and tighter tolerances, for both context networks. On correlated Gaussian data the true
conditional scores and the CSM optimum ``-1/2 sum_d 1/v_d`` are known in closed form.
"""
import time

import pytest
import torch
from conftest import fit

from csm_ext.data import CorrelatedGaussian
from csm_ext.models import MADECSM, PixelCNNppCSM

pytestmark = pytest.mark.slow


def _check_gaussian_fit(model, gs, x_test, min_corr, rel_loss, to_model=lambda x: x):
    with torch.no_grad():
        test_loss = float(model.loss(to_model(x_test)))
        s = model.score(to_model(x_test)).reshape(len(x_test), -1).double()
    s_true = gs.conditional_scores(x_test.double())
    corr = [float(torch.corrcoef(torch.stack([s[:, d], s_true[:, d]]))[0, 1])
            for d in range(gs.dim)]
    opt = gs.csm_optimum
    print(f"{type(model).__name__} D={gs.dim}: test loss {test_loss:.3f}, optimum {opt:.3f} "
          f"(ratio {test_loss / opt:.4f}); min score correlation {min(corr):.4f}")
    assert min(corr) > min_corr
    assert abs(test_loss - opt) < rel_loss * abs(opt)


def test_made_gaussian_consistency_16d():
    t0 = time.time()
    gs = CorrelatedGaussian(dim=16, seed=3)
    g = torch.Generator().manual_seed(1)
    x_train, x_test = gs.sample(50000, generator=g), gs.sample(5000, generator=g)
    torch.manual_seed(0)
    m = MADECSM(16, hidden_sizes=(128, 128), context_dim=8, head_hidden=32, head_layers=2,
                confine=0.0)
    fit(m, lambda: x_train[torch.randint(0, len(x_train), (256,), generator=g)],
         steps=3000, lr=3e-3)
    _check_gaussian_fit(m, gs, x_test, min_corr=0.96, rel_loss=0.05)
    print(f"{time.time() - t0:.0f} s")


def test_pixelcnnpp_gaussian_consistency():
    """A 1x4x4 'image' whose 16 pixels are a correlated Gaussian in raster order: the
    PixelCNN++-CSM's conditional scores match the true ones."""
    t0 = time.time()
    gs = CorrelatedGaussian(dim=16, seed=4)
    g = torch.Generator().manual_seed(2)
    x_train, x_test = gs.sample(50000, generator=g), gs.sample(2000, generator=g)
    torch.manual_seed(0)
    m = PixelCNNppCSM(1, 4, 4, nr_resnet=1, nr_filters=32, context_dim=16, head_hidden=32,
                      head_layers=2, confine=0.0)
    image = lambda x: x.view(-1, 1, 4, 4)  # noqa: E731
    fit(m, lambda: image(x_train[torch.randint(0, len(x_train), (128,), generator=g)]),
         steps=1500, lr=2e-3)
    m.eval()
    _check_gaussian_fit(m, gs, x_test, min_corr=0.9, rel_loss=0.1, to_model=image)
    print(f"{time.time() - t0:.0f} s")
