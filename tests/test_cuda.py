"""The CUDA kernels of the head op against the CPU kernels and the reference (needs a GPU).

Every test here is marked ``cuda`` and skipped when no CUDA device is visible (conftest.py).
Both CUDA paths are covered: the register-tiled kernels (H <= 128) and the generic ones (any H;
forced for small H with CSM_EXT_CUDA_PATH=generic).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing  # noqa: F401  (not imported by `import torch`)
from conftest import make_head_args

import csm_ext
from csm_ext import csm_loss, ops, reference

pytestmark = pytest.mark.cuda

ACTS = ops.ACTIVATIONS
ALPHA = 0.3
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}
NAMES = ("E", "dE", "d2E", "grad_z", "grad_x", "grad_u", "grad_W", "grad_b", "grad_w")


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


def assert_close_scaled(actual, expected, dtype, name=""):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{name}: {m}")


def random_grads(N, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(device)
            for _ in range(3)]


def op_outputs(args, grads, act):
    """Forward outputs and the six gradients from the raw ops (no autograd)."""
    out = torch.ops.csm_ext.head_jets(*args, ALPHA, act)
    back = torch.ops.csm_ext.head_jets_backward(*grads, *args, ALPHA, act)
    return list(out) + list(back)


def to(ts, device):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("H", [5, 64, 100, 130])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_and_reference(act, L, H, dtype, path):
    N = 1037  # several tiles and a partial last tile on every path
    args = make_head_args(N, H, L, dtype=dtype, seed=H + L)
    grads = random_grads(N, dtype, "cpu")
    cpu = op_outputs(args, grads, act)
    cuda = op_outputs(to(args, "cuda"), to(grads, "cuda"), act)
    torch.cuda.synchronize()
    for name, c, r in zip(NAMES, cuda, cpu):
        assert c.device.type == "cuda" and c.dtype == dtype and c.shape == r.shape
        assert_close_scaled(c.cpu().double(), r.double(), dtype, f"cuda vs cpu {name}")
    # ... and the reference (double backward through plain torch ops, in float64).
    args64 = [a.double().requires_grad_(True) for a in args]
    ref = reference.head_jets_ref(*args64, ALPHA, act)
    total = sum((o * g.double()).sum() for o, g in zip(ref, grads))
    ref_grads = torch.autograd.grad(total, args64, allow_unused=True, materialize_grads=True)
    for name, c, r in zip(NAMES, cuda, [o.detach() for o in ref] + list(ref_grads)):
        assert_close_scaled(c.cpu().double(), r, dtype, f"cuda vs reference {name}")


@pytest.mark.parametrize("act,L", [(a, L) for a in ACTS for L in (1, 2, 3)])
def test_gradcheck_float64_cuda(act, L, path):
    args = make_head_args(6, 5, L, device="cuda", requires_grad=True, seed=L)
    torch.autograd.gradcheck(lambda *a: ops.head_jets(*a, ALPHA, act), args)


def test_opcheck_cuda(path):
    for act, L in [("softplus", 1), ("tanh", 2), ("silu", 3)]:
        args = make_head_args(9, 6, L, device="cuda", requires_grad=True, seed=L)
        torch.library.opcheck(torch.ops.csm_ext.head_jets.default, (*args, ALPHA, act))
        plain = make_head_args(9, 6, L, dtype=torch.float32, device="cuda", seed=L)
        torch.library.opcheck(torch.ops.csm_ext.head_jets.default, (*plain, 0.0, act))
    args = make_head_args(9, 6, 2, device="cuda", seed=5)
    grads = random_grads(9, torch.float64, "cuda")
    torch.library.opcheck(torch.ops.csm_ext.head_jets_backward.default,
                          (*grads, *args, ALPHA, "tanh"))


def test_non_default_stream():
    """The kernels run on the caller's current stream: work queued before them on a side stream
    (here: producing the inputs) is respected, and results match the default stream's."""
    N, H, L = 20_000, 64, 2
    args = make_head_args(N, H, L, dtype=torch.float32, device="cuda", seed=3)
    grads = random_grads(N, torch.float32, "cuda")
    expected = op_outputs(args, grads, "silu")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Inputs written on the side stream right before the op: a kernel on another stream
        # could read them half-written.
        args_s = [torch.empty_like(a).copy_(a) for a in args]
        grads_s = [torch.empty_like(g).copy_(g) for g in grads]
        got = op_outputs(args_s, grads_s, "silu")
    side.synchronize()
    for name, a, b in zip(NAMES, got, expected):
        assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_first_is_current():
    args = make_head_args(300, 32, 2, device="cuda:1", seed=4)
    grads = random_grads(300, torch.float64, "cuda:1")
    with torch.cuda.device(0):
        got = op_outputs(args, grads, "tanh")
    expected = op_outputs(to(args, "cpu"), to(grads, "cpu"), "tanh")
    for name, a, b in zip(NAMES, got, expected):
        assert a.device == torch.device("cuda:1")
        assert_close_scaled(a.cpu(), b, torch.float64, name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cuda(backend):
    torch.manual_seed(1)
    head = csm_ext.EnergyHead(context_dim=5, hidden=32, layers=2, activation="silu",
                              confine=0.1).cuda()
    x = torch.randn(64, 3, device="cuda")
    ctx0 = torch.randn(64, 3, 5, device="cuda")

    def loss_fn(ctx, x):
        return csm_loss(head, ctx, x)

    def loss_and_grads(fn):
        head.zero_grad()
        ctx = ctx0.clone().requires_grad_(True)
        loss = fn(ctx, x)
        loss.backward()
        return loss.detach(), [ctx.grad] + [p.grad.clone() for p in head.parameters()]

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    loss_c, grads_c = loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend=counter))
    loss_e, grads_e = loss_and_grads(loss_fn)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_empty_batch_cuda(path):
    args = make_head_args(0, 8, 2, device="cuda", requires_grad=True)
    E, dE, d2E = ops.head_jets(*args, ALPHA, "softplus")
    assert E.shape == dE.shape == d2E.shape == (0,) and E.is_cuda
    (E.sum() + dE.sum() + d2E.sum()).backward()
    z, x, u, W, b, w = args
    assert z.grad.shape == (0, 8) and x.grad.shape == (0,)
    for p in (u, W, b, w):
        assert p.grad.is_cuda and torch.count_nonzero(p.grad) == 0


def test_non_contiguous_inputs_cuda():
    N, H, L = 41, 11, 3
    z = torch.randn(H, 2 * N, dtype=torch.float64, device="cuda").t()[::2]
    x = torch.randn(3 * N, dtype=torch.float64, device="cuda")[::3]
    W = (torch.randn(L - 1, H, H, dtype=torch.float64, device="cuda") / H ** 0.5).transpose(1, 2)
    _, _, u, _, b, w = make_head_args(N, H, L, device="cuda")
    args = (z, x, u, W, b, w)
    assert not z.is_contiguous() and not x.is_contiguous() and not W.is_contiguous()
    grads = random_grads(N, torch.float64, "cuda")
    got = op_outputs(args, grads, "silu")
    expected = op_outputs(to(args, "cpu"), to(grads, "cpu"), "silu")
    for name, a, b in zip(NAMES, got, expected):
        assert_close_scaled(a.cpu(), b, torch.float64, name)


def test_mixed_devices_are_rejected():
    z, x, u, W, b, w = make_head_args(5, 4, 2, device="cuda")
    with pytest.raises(ValueError, match="x is on"):
        ops.head_jets(z, x.cpu(), u, W, b, w, ALPHA, "tanh")


def _check_rows(args, grads, act, got, rows):
    """Per-element outputs of `rows` against the CPU kernels run on those rows alone."""
    z, x, u, W, b, w = args
    sub_args = [z[rows].cpu(), x[rows].cpu(), u.cpu(), W.cpu(), b.cpu(), w.cpu()]
    sub_grads = [g[rows].cpu() for g in grads]
    expected = op_outputs(sub_args, sub_grads, act)
    for name, a, r in zip(NAMES[:5], got[:5], expected[:5]):
        assert_close_scaled(a[rows].cpu().double(), r.double(), z.dtype, name)


@pytest.mark.parametrize("N,H", [(5_000_000, 64),
                                 # N·H > 2^31: element offsets need 64 bits.
                                 (17_000_000, 128)])
def test_huge_batch(N, H):
    L, act, dtype = 2, "softplus", torch.float32
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(N, H, device="cuda", dtype=dtype, generator=gen)
    x = torch.randn(N, device="cuda", dtype=dtype, generator=gen)
    _, _, u, W, b, w = make_head_args(1, H, L, dtype=dtype, device="cuda", seed=2)
    args = (z, x, u, W, b, w)
    grads = [torch.randn(N, device="cuda", dtype=dtype, generator=gen) for _ in range(3)]
    got = op_outputs(args, grads, act)
    assert all(torch.isfinite(t).all() for t in got)
    step = N // 1000
    rows = torch.cat([torch.arange(0, 300), torch.arange(N // 2, N // 2 + 7),
                      torch.arange(N - 300, N), torch.arange(0, N, step)]).cuda()
    _check_rows(args, grads, act, got, rows)
    # Weight gradients: the sum over chunks of float64 calls (different grids, same sums).
    del got[3]  # grad_z, the large one
    totals = None
    for c0 in range(0, N, 2_000_000):
        c1 = min(N, c0 + 2_000_000)
        part = torch.ops.csm_ext.head_jets_backward(
            *[g[c0:c1].double() for g in grads], z[c0:c1].double(), x[c0:c1].double(),
            u.double(), W.double(), b.double(), w.double(), ALPHA, act)[2:]
        totals = list(part) if totals is None else [t + p for t, p in zip(totals, part)]
    for name, a, r in zip(NAMES[5:], got[4:], totals):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=1e-3, atol=1e-3 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_deterministic_cuda(dtype, path):
    N, H, L = 300_000, 64, 3
    args = make_head_args(N, H, L, dtype=dtype, device="cuda", seed=11)
    grads = random_grads(N, dtype, "cuda")
    first = op_outputs(args, grads, "softplus")
    second = op_outputs(args, grads, "softplus")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


def test_energy_head_module_on_cuda_matches_cpu():
    torch.manual_seed(2)
    head = csm_ext.EnergyHead(context_dim=7, hidden=48, layers=3, activation="tanh", confine=0.2)
    head = head.double()
    ctx = torch.randn(33, 4, 7, dtype=torch.float64)
    x = torch.randn(33, 4, dtype=torch.float64)
    loss_cpu = csm_loss(head, ctx, x)
    g_cpu = torch.autograd.grad(loss_cpu, list(head.parameters()))
    head_cuda = head.cuda()
    loss_cuda = csm_loss(head_cuda, ctx.cuda(), x.cuda())
    g_cuda = torch.autograd.grad(loss_cuda, list(head_cuda.parameters()))
    torch.testing.assert_close(loss_cuda.cpu(), loss_cpu)
    for a, b in zip(g_cuda, g_cpu):
        torch.testing.assert_close(a.cpu(), b)
