"""Shared fixtures and helpers: random head arguments, a rounding-proof "did it change" test,
device selection.

Floats computed in batches of different sizes, with different thread counts or along different
code paths may differ in the last bits (oneDNN and MKL pick kernels by shape and CPU), so no test
compares such values for exact equality; :func:`changed` separates rounding from a real effect.
"""
from __future__ import annotations

import pytest
import torch


def make_head_args(N: int, H: int, L: int, dtype=torch.float64, device="cpu", seed: int = 0,
                   requires_grad: bool = False):
    """Random (z, x, u, W, b, w) for csm_ext.ops.head_jets with well-scaled values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.to(device).requires_grad_(requires_grad)

    return (rnd(N, H), rnd(N), rnd(H), rnd(L - 1, H, H, scale=H ** -0.5), rnd(L - 1, H, scale=0.5),
            rnd(H, scale=H ** -0.5))


def changed(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Elementwise: do ``a`` and ``b`` differ by more than rounding, i.e. by more than
    ``tol · (1 + max(|a|, |b|))``? Meant for float64 dependency tests, where rounding differences
    are ~1e-16 relative and a real dependency (an O(1) perturbation through O(0.1) weights) moves
    values by far more than 1e-9."""
    scale = 1 + torch.maximum(a.abs(), b.abs())
    return (a - b).abs() > tol * scale


def fit(model, sample_batch, steps, lr, seed=0):
    """Train ``model`` on its own loss: Adam, cosine schedule over ``steps``, fresh batches from
    ``sample_batch()``; returns the model."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = model.loss(sample_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
