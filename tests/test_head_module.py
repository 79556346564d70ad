"""EnergyHead, csm_loss, torch.compile, bad input, and the Gaussian sanity checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing  # CompileCounterWithBackend (not imported by torch itself)
from conftest import make_head_args

import csm_ext
from csm_ext import EnergyHead, csm_loss, ops


def make_head(backend="fused", dtype=torch.float64, **kw):
    torch.manual_seed(1)
    kw = {"context_dim": 5, "hidden": 12, "layers": 2, "activation": "silu", "confine": 0.1,
          **kw}
    return EnergyHead(backend=backend, **kw).to(dtype)


def test_build_info():
    info = csm_ext.build_info()
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["openmp"], "the CPU kernels must be compiled with OpenMP"
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 2, 5)])
def test_head_shapes_and_backends_agree(shape):
    head = make_head(backend="autograd")
    ctx = torch.randn(*shape, 5, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    ref = head.jets(ctx, x)
    for backend in csm_ext.BACKENDS:
        head.backend = backend
        for f, r in zip(head.jets(ctx, x), ref):
            assert f.shape == x.shape
            torch.testing.assert_close(f, r)
        assert head(ctx, x).shape == x.shape
        torch.testing.assert_close(head.score(ctx, x), -ref[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_csm_loss_fused_matches_autograd_including_ctx_grad(reduction):
    B, D, K = 6, 4, 5
    x = torch.randn(B, D, dtype=torch.float64)
    results = {}
    for backend in ("fused", "autograd"):
        head = make_head(backend)
        ctx = torch.randn(B, D, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ctx.requires_grad_(True)
        loss = csm_loss(head, ctx, x, reduction=reduction)
        loss.sum().backward()
        results[backend] = (loss.detach(), ctx.grad, [p.grad for p in head.parameters()])
    (lf, cf, pf), (lr, cr, pr) = results["fused"], results["autograd"]
    assert lf.shape == ((B,) if reduction == "none" else ())
    torch.testing.assert_close(lf, lr)
    torch.testing.assert_close(cf, cr)
    for a, b in zip(pf, pr):
        torch.testing.assert_close(a, b)


def test_csm_loss_reductions_are_consistent():
    head = make_head()
    ctx, x = torch.randn(5, 3, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    per = csm_loss(head, ctx, x, reduction="none")
    _, dE, d2E = head.jets(ctx, x)
    torch.testing.assert_close(per, (0.5 * dE ** 2 - d2E).sum(1))
    torch.testing.assert_close(csm_loss(head, ctx, x), per.mean())
    torch.testing.assert_close(csm_loss(head, ctx, x, reduction="sum"), per.sum())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """fullgraph=True fails on any graph break; AOTAutograd compiles the backward as well."""
    head = make_head(dtype=torch.float32)
    x = torch.randn(8, 3)
    ctx0 = torch.randn(8, 3, 5)

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


# ---------------------------------------------------------------- bad input
def _bad_op_cases():
    def case(name, mutate, match, exc=ValueError):
        return pytest.param(mutate, match, exc, id=name)

    return [
        case("z-1d", lambda a: a.update(z=a["z"][0]), "z must have shape"),
        case("z-int", lambda a: a.update(z=a["z"].long()), "z must be float32 or float64"),
        case("x-len", lambda a: a.update(x=a["x"][:-1]), "x must have shape"),
        case("u-len", lambda a: a.update(u=a["u"][:-1]), "u must have shape"),
        case("W-shape", lambda a: a.update(W=a["W"][:, :-1]), "W must have shape"),
        case("b-layers", lambda a: a.update(b=a["b"][:0]), "b must have shape"),
        case("w-len", lambda a: a.update(w=a["w"][:-1]), "w must have shape"),
        case("x-dtype", lambda a: a.update(x=a["x"].float()), "x has dtype"),
        case("W-dtype", lambda a: a.update(W=a["W"].float()), "W has dtype"),
        case("x-device", lambda a: a.update(x=a["x"].to("meta")), "x is on meta"),
        case("alpha-neg", lambda a: a.update(alpha=-1.0), "alpha"),
        case("alpha-nan", lambda a: a.update(alpha=float("nan")), "alpha"),
        case("activation", lambda a: a.update(activation="relu"), "activation must be one of"),
    ]


@pytest.mark.parametrize("mutate,match,exc", _bad_op_cases())
def test_bad_input_to_op_names_the_argument(mutate, match, exc):
    z, x, u, W, b, w = make_head_args(5, 4, 2)
    a = dict(z=z, x=x, u=u, W=W, b=b, w=w, alpha=0.1, activation="tanh")
    mutate(a)
    with pytest.raises(exc, match=match):
        ops.head_jets(**a)


# Mixed cpu/meta devices are rejected by the dispatcher before any kernel runs.
@pytest.mark.parametrize("mutate,match,exc",
                         [c for c in _bad_op_cases() if c.id != "x-device"])
def test_bad_input_to_raw_op_is_caught_in_cpp(mutate, match, exc):
    """The C++ kernel checks too, for callers that bypass the Python wrapper."""
    z, x, u, W, b, w = make_head_args(5, 4, 2)
    a = dict(z=z, x=x, u=u, W=W, b=b, w=w, alpha=0.1, activation="tanh")
    mutate(a)
    with pytest.raises(exc, match=match.split(" ")[0]):
        torch.ops.csm_ext.head_jets(*a.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(context_dim=0), "context_dim"), (dict(hidden=0), "hidden"), (dict(layers=0), "layers"),
    (dict(activation="gelu"), "activation"), (dict(confine=-1.0), "confine"),
    (dict(backend="triton"), "backend"),
])
def test_bad_head_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyHead(**{"context_dim": 3, **kwargs})


def test_bad_head_call_and_loss_arguments():
    head = make_head()
    ctx, x = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ctx must have shape"):
        head.jets(ctx[:, :3], x)
    with pytest.raises(ValueError, match="x must have shape"):
        head.jets(ctx, x[:3])
    with pytest.raises(ValueError, match="x has dtype"):
        head.jets(ctx, x.float())
    with pytest.raises(ValueError, match="reduction"):
        csm_loss(head, ctx, x, reduction="avg")


@pytest.mark.skipif(ops.cuda_kernels_available(), reason="this build has CUDA kernels")
def test_cuda_tensor_in_cpu_only_build_is_a_clear_error():
    # No GPU need be present: fake CUDA tensors carry the device through the argument check.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = [torch.empty(s, dtype=torch.float32, device="cuda")
                for s in ((5, 4), (5,), (4,), (1, 4, 4), (1, 4), (4,))]
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            ops.head_jets(*args, 0.1, "tanh")


# ---------------------------------------------------------------- Gaussian sanity
def test_gaussian_head_attains_the_optimum():
    """A head that is exactly Gaussian (w = 0, confine = 1/v) has E[L] = −½·Σ 1/v."""
    D, v, B = 4, 0.5, 200_000
    head = EnergyHead(context_dim=2, hidden=8, layers=2, confine=1.0 / v).double()
    with torch.no_grad():
        head.w.zero_()
    x = torch.randn(B, D, dtype=torch.float64) * math.sqrt(v)
    ctx = torch.randn(B, D, 2, dtype=torch.float64)
    loss = csm_loss(head, ctx, x, reduction="none")
    # Per-sample loss Σ_d x_d²/(2v²) − 1/v has standard deviation sqrt(D/2)/v.
    stderr = math.sqrt(D / 2) / v / math.sqrt(B)
    assert abs(loss.mean().item() - (-0.5 * D / v)) < 5 * stderr


@pytest.mark.parametrize("act", ops.ACTIVATIONS)
def test_csm_loss_is_fisher_divergence_up_to_a_constant(act):
    """E_p[½s_q² + s_q'] = ½E_p[(s_q − s_p)²] − ½E_p[s_p²] for any head (integration by parts),
    checked by Monte Carlo on 1-D Gaussian data with a random (non-Gaussian) head."""
    torch.manual_seed(0)
    v, B = 0.7, 400_000
    head = EnergyHead(context_dim=1, hidden=16, layers=2, activation=act, confine=0.5).double()
    x = torch.randn(B, 1, dtype=torch.float64) * math.sqrt(v)
    ctx = torch.zeros(B, 1, 1, dtype=torch.float64)
    lhs = csm_loss(head, ctx, x, reduction="none")
    s_q = head.score(ctx, x)
    s_p = -x / v
    rhs = 0.5 * (s_q - s_p).pow(2).sum(1) - 0.5 * s_p.pow(2).sum(1)
    diff = lhs - rhs  # zero mean, but not zero per sample
    assert abs(diff.mean().item()) < 5 * diff.std().item() / math.sqrt(B)
