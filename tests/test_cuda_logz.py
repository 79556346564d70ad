"""The CUDA kernels of the quadrature ops (head_logz, head_node_energies and their backward)
against the CPU kernels and the reference (needs a GPU).

Every test here is marked ``cuda`` and skipped when no CUDA device is visible (conftest.py).
Both CUDA paths are covered: the register-tiled kernels (H <= 128) and the generic ones (any H;
forced for small H with CSM_EXT_CUDA_PATH=generic). The host emulation of the same block code
(tests/test_cuda_emulation_logz.py) runs without a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing  # noqa: F401  (not imported by `import torch`)
from conftest import make_head_args

import csm_ext
from csm_ext import ops, quadrature, reference

pytestmark = pytest.mark.cuda

ACTS = ops.ACTIVATIONS
ALPHA = 0.3
# float32 sums over N·G rows (weight gradients): a little looser than the head-jets tests.
TOL = {torch.float64: 1e-10, torch.float32: 1e-3}
NAMES = ("out", "grad_z", "grad_u", "grad_W", "grad_b", "grad_w")


@pytest.fixture(autouse=True)
def _cuda_build():
    assert csm_ext.build_info()["cuda"], "a GPU is visible but csm_ext was built without CUDA"


@pytest.fixture(params=["auto", "generic"])
def path(request, monkeypatch):
    """Which CUDA kernels run: the planner's choice, or the generic ones forced."""
    if request.param == "generic":
        monkeypatch.setenv("CSM_EXT_CUDA_PATH", "generic")
    else:
        monkeypatch.delenv("CSM_EXT_CUDA_PATH", raising=False)
    return request.param


def weights(N, H, L, dtype=torch.float64, device="cpu", seed=0):
    z, _, u, W, b, w = make_head_args(N, H, L, dtype=dtype, seed=seed)
    return [t.to(device) for t in (z, u, W, b, w)]


def rule(G, dtype=torch.float64, device="cpu"):
    kind = "simpson" if G % 2 == 1 and G >= 3 else "gauss-legendre"
    t, lw = quadrature.rule((-2.0, 3.0), G, kind, dtype)
    return t.to(device), lw.to(device)


def assert_close_scaled(actual, expected, dtype, name="", factor=1.0):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOL[dtype] * factor
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def raw_ops(op, args, t, lw, act, grad_out):
    """(output, five gradients) from the raw ops of `op` ("logz" or "energies"), no autograd."""
    if op == "logz":
        out = torch.ops.csm_ext.head_logz(*args, ALPHA, act, t, lw)
        grads = torch.ops.csm_ext.head_logz_backward(grad_out, out, *args, ALPHA, act, t, lw)
    else:
        out = torch.ops.csm_ext.head_node_energies(*args, ALPHA, act, t)
        grads = torch.ops.csm_ext.head_node_energies_backward(grad_out, *args, ALPHA, act, t)
    return [out] + list(grads)


def reference_outputs(op, args, t, lw, act, grad_out):
    """The same from the pure-PyTorch reference in float64 (on the device of args)."""
    args64 = [a.detach().double().requires_grad_(True) for a in args]
    if op == "logz":
        out = reference.head_logz_ref(*args64, ALPHA, act, t.double(), lw.double())
    else:
        out = reference.head_node_energies_ref(*args64, ALPHA, act, t.double())
    grads = torch.autograd.grad(out, args64, grad_out.double(), allow_unused=True,
                                materialize_grads=True)
    return [out.detach()] + list(grads)


def grad_for(op, N, G, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (N,) if op == "logz" else (N, G)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def to(ts, device):
    return [t.to(device) for t in ts]


_CPU_RESULTS: dict = {}


@pytest.mark.parametrize("op", ["logz", "energies"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H", [5, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_and_reference(op, act, L, H, dtype, path):
    # Many blocks, each with several elements, chunks cutting elements, partial last chunks.
    N, G = 601, 65
    args = weights(N, H, L, dtype, seed=H + L)
    t, lw = rule(G, dtype)
    g = grad_for(op, N, G, dtype)
    key = (op, act, L, H, dtype)
    if key not in _CPU_RESULTS:  # shared by both paths
        _CPU_RESULTS[key] = raw_ops(op, args, t, lw, act, g)
    cpu = _CPU_RESULTS[key]
    cuda = raw_ops(op, to(args, "cuda"), t.cuda(), lw.cuda(), act, g.cuda())
    torch.cuda.synchronize()
    for name, c, r in zip(NAMES, cuda, cpu):
        assert c.device.type == "cuda" and c.dtype == dtype and c.shape == r.shape, name
        assert_close_scaled(c.cpu().double(), r.double(), dtype, f"{op} cuda vs cpu {name}")
    ref = reference_outputs(op, to(args, "cuda"), t.cuda(), lw.cuda(), act, g.cuda())
    for name, c, r in zip(NAMES, cuda, ref):
        assert_close_scaled(c.double(), r, dtype, f"{op} cuda vs reference {name}", factor=2)


@pytest.mark.parametrize("G", [2, 3, 97, 1024, 1025])
@pytest.mark.parametrize("H", [37, 64])
def test_node_counts(G, H, path):
    """G = 2 (the least), G just above a chunk, and G = 1024 (many chunks per element)."""
    N = 50 if G >= 1024 else 400
    args = weights(N, H, 2, torch.float64, seed=G)
    t, lw = rule(G)
    for op in ("logz", "energies"):
        g = grad_for(op, N, G, torch.float64)
        cpu = raw_ops(op, args, t, lw, "silu", g)
        cuda = raw_ops(op, to(args, "cuda"), t.cuda(), lw.cuda(), "silu", g.cuda())
        for name, c, r in zip(NAMES, cuda, cpu):
            assert_close_scaled(c.cpu(), r, torch.float64, f"{op} G={G} {name}")


@pytest.mark.parametrize("H", [3, 33, 127, 129, 300])
def test_odd_widths(H, path):
    N, G = 200, 33
    args = weights(N, H, 3, torch.float32, seed=H)
    t, lw = rule(G, torch.float32)
    for op in ("logz", "energies"):
        g = grad_for(op, N, G, torch.float32)
        cpu = raw_ops(op, args, t, lw, "tanh", g)
        cuda = raw_ops(op, to(args, "cuda"), t.cuda(), lw.cuda(), "tanh", g.cuda())
        for name, c, r in zip(NAMES, cuda, cpu):
            assert_close_scaled(c.cpu(), r, torch.float32, f"{op} H={H} {name}")


@pytest.mark.parametrize("act,L", [(a, L) for a in ACTS for L in (1, 2, 3)])
def test_gradcheck_float64_cuda(act, L, path):
    args = [a.requires_grad_(True) for a in weights(5, 4, L, device="cuda", seed=L)]
    t, lw = rule(7, device="cuda")
    torch.autograd.gradcheck(lambda *a: ops.head_logz(*a, ALPHA, act, t, lw), args)
    torch.autograd.gradcheck(lambda *a: ops.head_node_energies(*a, ALPHA, act, t), args)


def test_opcheck_cuda(path):
    args = weights(7, 5, 2, device="cuda", seed=1)
    t, lw = rule(9, device="cuda")
    params = [a.clone().requires_grad_(True) for a in args]
    torch.library.opcheck(torch.ops.csm_ext.head_logz.default, (*params, ALPHA, "tanh", t, lw))
    torch.library.opcheck(torch.ops.csm_ext.head_node_energies.default,
                          (*params, ALPHA, "softplus", t))
    logz = ops.head_logz(*args, ALPHA, "tanh", t, lw)
    torch.library.opcheck(torch.ops.csm_ext.head_logz_backward.default,
                          (torch.randn(7, dtype=torch.float64, device="cuda"), logz, *args, ALPHA,
                           "tanh", t, lw))
    torch.library.opcheck(torch.ops.csm_ext.head_node_energies_backward.default,
                          (torch.randn(7, 9, dtype=torch.float64, device="cuda"), *args, ALPHA,
                           "softplus", t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_cuda(dtype, path):
    """Two identical calls give bitwise identical values and gradients (no atomics: weight
    gradients are summed per block, then over blocks in block order)."""
    N, H, L, G = 50_000, 64, 3, 129
    args = weights(N, H, L, dtype, device="cuda", seed=11)
    t, lw = rule(G, dtype, device="cuda")
    for op in ("logz", "energies"):
        g = grad_for(op, N, G, dtype).cuda()
        first = raw_ops(op, args, t, lw, "softplus", g)
        second = raw_ops(op, args, t, lw, "softplus", g)
        for name, a, b in zip(NAMES, first, second):
            assert torch.equal(a, b), f"{op} {name} differs between two identical calls"


def test_empty_batch_cuda(path):
    args = [a.requires_grad_(True) for a in weights(0, 8, 2, device="cuda")]
    t, lw = rule(5, device="cuda")
    logz = ops.head_logz(*args, ALPHA, "softplus", t, lw)
    E = ops.head_node_energies(*args, ALPHA, "softplus", t)
    assert logz.shape == (0,) and E.shape == (0, 5) and logz.is_cuda and E.is_cuda
    (logz.sum() + E.sum()).backward()
    z, u, W, b, w = args
    assert z.grad.shape == (0, 8)
    for p in (u, W, b, w):
        assert p.grad.is_cuda and torch.count_nonzero(p.grad) == 0


def test_nan_stays_in_its_element_cuda(path):
    args = weights(300, 20, 2, device="cuda", seed=3)
    args[0][123, 4] = float("nan")
    args[0][7] *= 1e3  # extreme energies: the running max keeps it finite
    t, lw = rule(257, device="cuda")
    logz = ops.head_logz(*args, ALPHA, "softplus", t, lw)
    E = ops.head_node_energies(*args, ALPHA, "softplus", t)
    keep = torch.ones(300, dtype=torch.bool, device="cuda")
    keep[123] = False
    assert torch.isnan(logz[123]) and torch.isnan(E[123]).all()
    assert torch.isfinite(logz[keep]).all() and torch.isfinite(E[keep]).all()
    ref = ops.head_logz(*to(args, "cpu"), ALPHA, "softplus", t.cpu(), lw.cpu())
    assert_close_scaled(logz[keep].cpu(), ref[keep.cpu()], torch.float64, "logz")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cuda(backend):
    args = [a.requires_grad_(True) for a in weights(64, 32, 2, torch.float32, "cuda", seed=1)]
    t, lw = rule(33, torch.float32, device="cuda")

    def f(z, u, W, b, w):
        logz = ops.head_logz(z, u, W, b, w, ALPHA, "silu", t, lw)
        E = ops.head_node_energies(z, u, W, b, w, ALPHA, "silu", t)
        return logz.mean() + (E[:, 0] - logz).square().mean()

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c, args)
    out_e = f(*args)
    grads_e = torch.autograd.grad(out_e, args)
    assert counter.frame_count == 1
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_non_contiguous_inputs_cuda():
    N, H, L, G = 41, 11, 3, 9
    z = torch.randn(H, 2 * N, dtype=torch.float64, device="cuda").t()[::2]
    W = (torch.randn(L - 1, H, H, dtype=torch.float64, device="cuda") / H ** 0.5).transpose(1, 2)
    _, u, _, b, w = weights(N, H, L, device="cuda")
    tt, ll = rule(G, device="cuda")
    t = torch.stack([tt, tt]).t()[:, 0]
    lw = torch.stack([ll, ll]).t()[:, 1]
    args = [z, u, W, b, w]
    assert not z.is_contiguous() and not W.is_contiguous() and not t.is_contiguous()
    for op in ("logz", "energies"):
        g = grad_for(op, N, G, torch.float64).cuda()
        got = raw_ops(op, args, t, lw, "silu", g)
        expected = raw_ops(op, to(args, "cpu"), t.cpu(), lw.cpu(), "silu", g.cpu())
        for name, a, e in zip(NAMES, got, expected):
            assert_close_scaled(a.cpu(), e, torch.float64, f"{op} {name}")


def test_mixed_devices_are_rejected():
    args = weights(5, 4, 2, device="cuda")
    t, lw = rule(5, device="cuda")
    with pytest.raises(ValueError, match="nodes is on"):
        ops.head_logz(*args, ALPHA, "tanh", t.cpu(), lw)
    with pytest.raises(ValueError, match="log_weights is on"):
        ops.head_logz(*args, ALPHA, "tanh", t, lw.cpu())
    with pytest.raises(ValueError, match="nodes is on"):
        torch.ops.csm_ext.head_node_energies(*args, ALPHA, "tanh", t.cpu())


def test_non_default_stream():
    """The kernels run on the caller's current stream."""
    N, H, L, G = 20_000, 64, 2, 65
    args = weights(N, H, L, torch.float32, "cuda", seed=3)
    t, lw = rule(G, torch.float32, device="cuda")
    g = grad_for("logz", N, G, torch.float32).cuda()
    expected = raw_ops("logz", args, t, lw, "silu", g)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        args_s = [torch.empty_like(a).copy_(a) for a in args]
        g_s = torch.empty_like(g).copy_(g)
        got = raw_ops("logz", args_s, t, lw, "silu", g_s)
    side.synchronize()
    for name, a, b in zip(NAMES, got, expected):
        assert torch.equal(a, b), name


def test_benchmark_size_runs():
    """The benchmark's size (N = 784·64, G = 1024, H = 64): values match the CPU op on a sample
    of elements, gradients are finite."""
    N, H, L, G = 784 * 64, 64, 2, 1024
    args = [a.requires_grad_(True) for a in weights(N, H, L, torch.float32, "cuda", seed=5)]
    t, lw = rule(G - 1, torch.float32, device="cuda")
    logz = ops.head_logz(*args, ALPHA, "softplus", t, lw)
    logz.sum().backward()
    rows = torch.arange(0, N, 997)
    sub = [args[0].detach()[rows].cpu()] + [a.detach().cpu() for a in args[1:]]
    ref = ops.head_logz(*sub, ALPHA, "softplus", t.cpu(), lw.cpu())
    assert_close_scaled(logz.detach()[rows].cpu(), ref, torch.float32, "logz")
    for a in args:
        assert torch.isfinite(a.grad).all()
