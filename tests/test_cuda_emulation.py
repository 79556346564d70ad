"""The CUDA kernels' block algorithm, run on the host, against the CPU kernels.

``csrc/cuda/head_jets_block.h`` holds everything the CUDA kernels compute, written as stages
separated by block barriers. ``tests/cuda_emulator.cpp`` runs those stages with all 256 thread
indices in turn (three different orders), block by block, on NaN-poisoned block memory. This
checks the index math, padding, tail tiles, barrier placement and the cross-block reduction of
the GPU code on machines without a GPU (needs only a C++17 compiler; skipped without one).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_head_args

from csm_ext import ops

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "cuda_emulator.cpp", ROOT / "csrc" / "cuda" / "head_jets_block.h",
           ROOT / "csrc" / "head_math.h"]
ACT_CODE = {"softplus": 0, "tanh": 1, "silu": 2}
ALPHA = 0.3
TILED, GENERIC = 1, 2


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulator")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    lib = tmp_path_factory.mktemp("cuda_emulator") / f"emu_{digest}.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fno-strict-aliasing", "-fPIC", "-shared",
           f"-I{ROOT / 'csrc'}", str(SOURCES[0]), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    so = ctypes.CDLL(str(lib))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    so.emu_tiled_tile.argtypes = [ctypes.c_int, i64]
    so.emu_head_jets.argtypes = ([ctypes.c_int] * 4 + [i64] * 3 + [p] * 6 + [ctypes.c_double]
                                 + [p] * 3 + [i64, ctypes.c_int])
    so.emu_head_jets_backward.argtypes = ([ctypes.c_int] * 5 + [i64] * 3 + [p] * 9
                                          + [ctypes.c_double] + [p] * 6 + [i64, ctypes.c_int])
    return so


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def emulate(so, args, grads, act, path, tile=0, acc_local=True, nblocks=1, order=0):
    """Forward outputs and the six input gradients computed by the emulated kernels."""
    z, x, u, W, b, w = (a.contiguous() for a in args)
    N, H = z.shape
    L = W.shape[0] + 1
    dtype = 0 if z.dtype == torch.float32 else 1
    nan = float("nan")
    E, dE, d2E = (torch.full((N,), nan, dtype=z.dtype) for _ in range(3))
    rc = so.emu_head_jets(dtype, ACT_CODE[act], path, tile, N, H, L, *map(_ptr, (z, x, u, W, b, w)),
                          ALPHA, _ptr(E), _ptr(dE), _ptr(d2E), nblocks, order)
    assert rc == 0
    gE, gdE, gd2E = (g.contiguous() for g in grads)
    outs = [torch.full_like(t, nan) for t in (z, x, u, W, b, w)]
    rc = so.emu_head_jets_backward(dtype, ACT_CODE[act], path, tile, int(acc_local), N, H, L,
                                   *map(_ptr, (gE, gdE, gd2E, z, x, u, W, b, w)), ALPHA,
                                   *map(_ptr, outs), nblocks, order)
    assert rc == 0
    return [E, dE, d2E], outs


def cpu_reference(args, grads, act):
    out = ops.head_jets(*args, ALPHA, act)
    g = torch.ops.csm_ext.head_jets_backward(*grads, *args, ALPHA, act)
    return list(out), list(g)


def assert_close(actual, expected, dtype, name):
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def check_case(so, N, H, L, act, dtype, path, tile=0, acc_local=True, nblocks=1, seed=0):
    args = make_head_args(N, H, L, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    ref_out, ref_grads = cpu_reference(args, grads, act)
    results = [emulate(so, args, grads, act, path, tile, acc_local, nblocks, order)
               for order in (0, 1, 2)]
    names = ("E", "dE", "d2E", "grad_z", "grad_x", "grad_u", "grad_W", "grad_b", "grad_w")
    out, gr = results[0]
    for name, a, r in zip(names, out + gr, ref_out + ref_grads):
        assert a.shape == r.shape
        assert torch.isfinite(a).all(), f"{name}: not finite (a read of unwritten memory?)"
        assert_close(a, r, dtype, name)
    # Another thread order inside each stage must give bitwise the same result: a stage that
    # read what another thread of the same stage writes would depend on the order.
    for other_out, other_gr in results[1:]:
        for name, a, c in zip(names, out + gr, other_out + other_gr):
            assert torch.equal(a, c), f"{name}: depends on the thread order inside a stage"


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H", [5, 32, 64, 100])
def test_tiled_path_float64(emu, act, L, H):
    T = emu.emu_tiled_tile(1, H)
    # Three blocks over 2.5 rounds of tiles: grid-stride loop, record sums, a partial tail tile.
    N = 3 * T * 2 + T // 2 + 1
    check_case(emu, N, H, L, act, torch.float64, TILED, nblocks=3, seed=H + L)


@pytest.mark.parametrize("act", list(ACT_CODE))
def test_tiled_path_width_128_and_global_record(emu, act):
    T = emu.emu_tiled_tile(1, 128)
    check_case(emu, 2 * T + 3, 128, 2, act, torch.float64, TILED, nblocks=2, seed=7)
    # The gradient record kept in the block's global slice instead of shared memory.
    check_case(emu, 2 * T + 3, 37, 3, act, torch.float64, TILED, acc_local=False, nblocks=2,
               seed=8)


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("H", [7, 64, 100])
def test_tiled_path_float32(emu, act, H):
    T = emu.emu_tiled_tile(0, H)
    check_case(emu, 2 * T + 5, H, 3, act, torch.float32, TILED, nblocks=2, seed=H)


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H,tile", [(5, 8), (33, 4), (130, 2), (64, 1), (20, 32)])
def test_generic_path(emu, act, L, H, tile):
    check_case(emu, 5 * tile + 1, H, L, act, torch.float64, GENERIC, tile=tile, nblocks=2,
               seed=H + L)


def test_single_element_many_blocks(emu):
    """More blocks than tiles: idle blocks must contribute exact zeros to the records."""
    check_case(emu, 1, 9, 2, "silu", torch.float64, TILED, nblocks=4)
    check_case(emu, 1, 9, 2, "tanh", torch.float64, GENERIC, tile=4, nblocks=3)


def test_tail_rows_and_padding_hold_nan_free_junk(emu):
    """NaN in one element stays in that element (padded units and tail rows are masked)."""
    args = make_head_args(40, 20, 3, seed=3)
    args[1][5] = float("nan")
    grads = [torch.randn(40, dtype=torch.float64) for _ in range(3)]
    (E, dE, d2E), _ = emulate(emu, args, grads, "softplus", TILED, nblocks=2)
    ref = ops.head_jets(*args, ALPHA, "softplus")
    for a, r in zip((E, dE, d2E), ref):
        assert torch.isnan(a[5])
        mask = torch.ones(40, dtype=torch.bool)
        mask[5] = False
        torch.testing.assert_close(a[mask], r[mask])
