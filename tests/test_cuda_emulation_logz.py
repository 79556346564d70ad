"""The CUDA quadrature kernels' block algorithm, run on the host, against the CPU ops.

``csrc/cuda/head_logz_block.h`` holds everything the CUDA kernels of ``head_node_energies``,
``head_logz`` and their backward compute, written as stages separated by block barriers.
``tests/cuda_emulator.cpp`` runs those stages with all 256 thread indices in turn (three orders),
block by block, on NaN-poisoned block memory (see tests/test_cuda_emulation.py for the head-jets
twin). Covered here: both paths (register-tiled, generic with several chunk sizes), several
blocks (each owning a contiguous range of elements), chunks that cut elements (G larger than a
chunk, and small G with several elements per chunk), tail chunks, idle blocks, L in {1, 2, 3},
every activation, float32 and float64, the gradient record in block memory or in its global slice,
and NaN staying in its element. Reference: the CPU ops, gradients through their autograd.
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

from csm_ext import ops, quadrature

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "cuda_emulator.cpp", ROOT / "csrc" / "cuda" / "head_logz_block.h",
           ROOT / "csrc" / "cuda" / "head_jets_block.h", ROOT / "csrc" / "head_math.h"]
ACT_CODE = {"softplus": 0, "tanh": 1, "silu": 2}
ALPHA = 0.3
TILED, GENERIC = 1, 2
NAMES = ("grad_z", "grad_u", "grad_W", "grad_b", "grad_w")


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulator")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    lib = tmp_path_factory.mktemp("cuda_emulator_logz") / f"emu_{digest}.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fno-strict-aliasing", "-fPIC", "-shared",
           f"-I{ROOT / 'csrc'}", str(SOURCES[0]), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    so = ctypes.CDLL(str(lib))
    i32, i64, p, dbl = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    so.emu_quad_tiled_rows.argtypes = [i32, i64]
    so.emu_quad_forward.argtypes = ([i32] * 5 + [i64] * 4 + [p] * 5 + [dbl] + [p] * 3
                                    + [i64, i32])
    so.emu_quad_backward.argtypes = ([i32] * 6 + [i64] * 4 + [p] * 7 + [dbl] + [p] * 7
                                     + [i64, i32])
    return so


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _dtype_code(dtype):
    return 0 if dtype == torch.float32 else 1


def emulate_forward(so, weights, act, t, lw, path, rows=0, nblocks=1, order=0):
    """log Z (lw given) or the node energies (lw None) computed by the emulated kernels."""
    z, u, W, b, w = (a.contiguous() for a in weights)
    N, H = z.shape
    L, G = W.shape[0] + 1, t.shape[0]
    logz = lw is not None
    out = torch.full((N,) if logz else (N, G), float("nan"), dtype=z.dtype)
    rc = so.emu_quad_forward(_dtype_code(z.dtype), ACT_CODE[act], path, rows, int(logz), N, H, L,
                             G, *map(_ptr, (z, u, W, b, w)), ALPHA, _ptr(t.contiguous()),
                             _ptr(None if lw is None else lw.contiguous()), _ptr(out), nblocks,
                             order)
    assert rc == 0
    return out


def emulate_backward(so, weights, act, t, lw, grad, logz, path, rows=0, acc_local=True,
                     nblocks=1, order=0):
    """The five gradients (z, u, W, b, w) from the emulated backward kernels: of log Z given
    grad_logz and the forward's log Z (lw given), else of the node energies given grad_E."""
    z, u, W, b, w = (a.contiguous() for a in weights)
    N, H = z.shape
    L, G = W.shape[0] + 1, t.shape[0]
    is_logz = lw is not None
    outs = [torch.full_like(a, float("nan")) for a in (z, u, W, b, w)]
    rc = so.emu_quad_backward(_dtype_code(z.dtype), ACT_CODE[act], path, rows, int(acc_local),
                              int(is_logz), N, H, L, G, _ptr(grad.contiguous()),
                              _ptr(None if logz is None else logz.contiguous()),
                              *map(_ptr, (z, u, W, b, w)), ALPHA, _ptr(t.contiguous()),
                              _ptr(None if lw is None else lw.contiguous()), *map(_ptr, outs),
                              nblocks, order)
    assert rc == 0
    return outs


def make_case(N, H, L, G, dtype, seed):
    z, _, u, W, b, w = make_head_args(N, H, L, dtype=dtype, seed=seed)
    kind = "simpson" if G % 2 == 1 and G >= 3 else "gauss-legendre"
    t, lw = quadrature.rule((-2.0, 3.0), G, kind, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    g_logz = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    g_E = torch.randn(N, G, generator=gen, dtype=torch.float64).to(dtype)
    return [z, u, W, b, w], t, lw, g_logz, g_E


def cpu_values_and_grads(fn, weights, grad_out):
    """The CPU op's output and the gradients of <output, grad_out> through its autograd."""
    args = [a.detach().clone().requires_grad_(True) for a in weights]
    out = fn(*args)
    grads = torch.autograd.grad(out, args, grad_out, allow_unused=True, materialize_grads=True)
    return out.detach(), list(grads)


def assert_close(actual, expected, dtype, name):
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def check_case(so, N, H, L, G, act, dtype, path, rows=0, acc_local=True, nblocks=1, seed=0,
               orders=(0, 1, 2)):
    weights, t, lw, g_logz, g_E = make_case(N, H, L, G, dtype, seed)
    ref_logz, ref_logz_grads = cpu_values_and_grads(
        lambda *a: ops.head_logz(*a, ALPHA, act, t, lw), weights, g_logz)
    ref_E, ref_E_grads = cpu_values_and_grads(
        lambda *a: ops.head_node_energies(*a, ALPHA, act, t), weights, g_E)

    def run(order):
        logz = emulate_forward(so, weights, act, t, lw, path, rows, nblocks, order)
        E = emulate_forward(so, weights, act, t, None, path, rows, nblocks, order)
        # The backward gets the emulated forward's log Z, as autograd would pass it.
        gl = emulate_backward(so, weights, act, t, lw, g_logz, logz, path, rows, acc_local,
                              nblocks, order)
        gE = emulate_backward(so, weights, act, t, None, g_E, None, path, rows, acc_local,
                              nblocks, order)
        return [logz, E] + gl + gE

    names = (["logz", "E"] + [f"logz {n}" for n in NAMES] + [f"node energies {n}" for n in NAMES])
    expected = [ref_logz, ref_E] + ref_logz_grads + ref_E_grads
    results = [run(order) for order in orders]
    for name, a, r in zip(names, results[0], expected):
        assert a.shape == r.shape and a.dtype == dtype, name
        assert torch.isfinite(a).all(), f"{name}: not finite (a read of unwritten memory?)"
        assert_close(a, r, dtype, name)
    # Another thread order inside each stage must give bitwise the same result: a stage that
    # read what another thread of the same stage writes would depend on the order.
    for other in results[1:]:
        for name, a, c in zip(names, results[0], other):
            assert torch.equal(a, c), f"{name}: depends on the thread order inside a stage"


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H", [5, 64, 100])
def test_tiled_path_float64(emu, act, L, H):
    R = emu.emu_quad_tiled_rows(1, H)
    # G larger than a chunk and not a multiple of it (elements cut across chunks, carried
    # logsumexp), three blocks of unequal element counts, a partial last chunk per block.
    check_case(emu, 7, H, L, R + 13, act, torch.float64, TILED, nblocks=3, seed=H + L)


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("G", [2, 5, 9])
def test_tiled_path_small_G_float64(emu, act, G):
    """Several elements per chunk, one cut at each chunk boundary."""
    R = emu.emu_quad_tiled_rows(1, 32)
    N = 2 * (2 * R // G) + 3
    check_case(emu, N, 32, 2, G, act, torch.float64, TILED, nblocks=2, seed=G)


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("H,G", [(7, 65), (64, 129), (100, 33)])
def test_tiled_path_float32(emu, act, H, G):
    R = emu.emu_quad_tiled_rows(0, H)
    N = 2 * R // G + 3
    check_case(emu, N, H, 3, G, act, torch.float32, TILED, nblocks=2, seed=H, orders=(0, 2))


@pytest.mark.parametrize("act", list(ACT_CODE))
def test_tiled_width_128_and_global_record(emu, act):
    R = emu.emu_quad_tiled_rows(1, 128)
    check_case(emu, 5, 128, 2, R // 2 + 1, act, torch.float64, TILED, nblocks=2, seed=7,
               orders=(0, 1))
    # The gradient record kept in the block's global slice instead of block memory.
    check_case(emu, 9, 37, 3, 17, act, torch.float64, TILED, acc_local=False, nblocks=2, seed=8)


@pytest.mark.parametrize("act", list(ACT_CODE))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H,rows,G", [(5, 8, 3), (33, 16, 40), (130, 2, 5), (20, 1, 2),
                                      (9, 37, 100)])
def test_generic_path(emu, act, L, H, rows, G):
    check_case(emu, 5, H, L, G, act, torch.float64, GENERIC, rows=rows, nblocks=2,
               seed=H + L + G)


def test_generic_path_float32(emu):
    check_case(emu, 6, 45, 2, 1025, "silu", torch.float32, GENERIC, rows=96, nblocks=2, seed=3,
               orders=(0, 2))


def test_large_G(emu):
    """G = 1024 (the benchmark's largest): many chunks per element, long carries."""
    check_case(emu, 3, 16, 2, 1024, "softplus", torch.float64, TILED, nblocks=2, seed=5,
               orders=(0, 1))


def test_more_blocks_than_elements(emu):
    """Idle blocks (no elements) must contribute exact zeros to the records."""
    check_case(emu, 1, 9, 2, 5, "silu", torch.float64, TILED, nblocks=4)
    check_case(emu, 2, 9, 2, 3, "tanh", torch.float64, GENERIC, rows=4, nblocks=3)


def test_nan_stays_in_its_element(emu):
    """A NaN in one element's context makes its log Z and node energies NaN, and nothing else:
    tail rows, padded units and the carries of the other elements are masked."""
    R = emu.emu_quad_tiled_rows(1, 20)
    N, G = 9, R // 2 + 3  # elements 3 and 4 are cut by chunk boundaries
    weights, t, lw, _, _ = make_case(N, 20, 3, G, torch.float64, seed=3)
    weights[0][4, 7] = float("nan")
    for path, rows in ((TILED, 0), (GENERIC, 8)):
        logz = emulate_forward(emu, weights, "softplus", t, lw, path, rows, nblocks=2)
        E = emulate_forward(emu, weights, "softplus", t, None, path, rows, nblocks=2)
        ref_logz = ops.head_logz(*weights, ALPHA, "softplus", t, lw)
        ref_E = ops.head_node_energies(*weights, ALPHA, "softplus", t)
        keep = torch.ones(N, dtype=torch.bool)
        keep[4] = False
        assert torch.isnan(logz[4]) and torch.isnan(E[4]).all()
        assert_close(logz[keep], ref_logz[keep], torch.float64, "logz")
        assert_close(E[keep], ref_E[keep], torch.float64, "E")


def test_extreme_energies(emu):
    """Large energies (z scaled up): the running max keeps the logsumexp finite."""
    weights, t, lw, _, _ = make_case(4, 6, 2, 31, torch.float64, seed=2)
    weights[0] = weights[0] * 1e3
    weights[4] = weights[4] * 50
    logz = emulate_forward(emu, weights, "softplus", t, lw, TILED, nblocks=2)
    ref = ops.head_logz(*weights, ALPHA, "softplus", t, lw)
    assert torch.isfinite(logz).all()
    assert_close(logz, ref, torch.float64, "logz")
