"""Shared fixtures: random head arguments and device selection."""
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
