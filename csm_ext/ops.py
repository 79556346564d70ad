"""Dispatcher-registered ops of csm_ext, with their fake kernels and autograd formulas.

The schemas live in C++ (csrc/ops.cpp) and the kernels in csrc/cpu and csrc/cuda. This module
adds what PyTorch needs around them:

* fake (meta) kernels, so the ops trace under ``torch.compile`` and ``torch.export``;
* the autograd formula of ``head_jets`` (its backward is the ``head_jets_backward`` op, which
  recomputes the head instead of saving H-wide intermediates);
* the autograd formula of ``head_jets_backward`` itself, so second derivatives (a gradient
  penalty, training through a joint score) are exact: they come from autograd through the
  pure-PyTorch reference (:func:`csm_ext.reference.head_jets_ref`), not from a fused kernel;
* :func:`head_jets`, a typed wrapper that checks its arguments and names the wrong one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._native import _C  # noqa: F401  (loading the library registers the ops)

ACTIVATIONS = ("softplus", "tanh", "silu")

__all__ = ["ACTIVATIONS", "head_jets", "head_logz", "head_node_energies", "check_head_args",
           "check_quadrature_args", "cuda_kernels_available"]


def cuda_kernels_available() -> bool:
    """True when this build of csm_ext contains CUDA kernels."""
    return bool(_C.WITH_CUDA)


def check_head_args(z: Tensor, x: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor,
                    alpha: float, activation: str) -> None:
    """Validate the arguments of :func:`head_jets`; raise ``ValueError`` naming the bad one."""
    _check_head_weights(z, u, W, b, w, alpha, activation)
    _check_like(x, "x", (z.shape[0],), z)


def check_quadrature_args(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
                          activation: str, nodes: Tensor, log_weights: Tensor | None = None) -> None:
    """Validate the arguments of :func:`head_logz` / :func:`head_node_energies`."""
    _check_head_weights(z, u, W, b, w, alpha, activation)
    if nodes.dim() != 1 or nodes.shape[0] < 2:
        raise ValueError(f"nodes must have shape (G,) with G >= 2; got {tuple(nodes.shape)}")
    _check_like(nodes, "nodes", tuple(nodes.shape), z)
    if log_weights is not None:
        _check_like(log_weights, "log_weights", tuple(nodes.shape), z)


def _check_like(t: Tensor, name: str, shape: tuple, z: Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if t.dtype != z.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but z has dtype {z.dtype}")
    if t.device != z.device:
        raise ValueError(f"{name} is on {t.device} but z is on {z.device}")


def _check_head_weights(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
                        activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (N, H) with H >= 1; got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be float32 or float64; got {z.dtype}")
    N, H = z.shape
    L1 = W.shape[0] if W.dim() == 3 else -1
    expected = {"u": (H,), "W": (L1, H, H), "b": (L1, H), "w": (H,)}
    for name, t in (("u", u), ("W", W), ("b", b), ("w", w)):
        if tuple(t.shape) != expected[name]:
            shape = "(L-1, H, H)" if name == "W" else str(expected[name])
            raise ValueError(f"{name} must have shape {shape} with N={N}, H={H}; "
                             f"got {tuple(t.shape)}")
        if t.dtype != z.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but z has dtype {z.dtype}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    if not alpha >= 0.0:  # also rejects NaN
        raise ValueError(f"alpha (the confinement) must be >= 0; got {alpha}")
    if z.device.type == "cuda" and not cuda_kernels_available():
        raise RuntimeError(
            "z is a CUDA tensor but this csm_ext build has no CUDA kernels; rebuild with a CUDA "
            "torch and toolkit (FORCE_CUDA=1 pip install --no-build-isolation -e .)")


def head_jets(z: Tensor, x: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor,
              alpha: float = 0.0, activation: str = "softplus") -> tuple[Tensor, Tensor, Tensor]:
    """Energies of the head and their first and second derivative in x, fused.

    Args:
        z: (N, H) projected context (``A c + b0``), one row per element.
        x: (N,) the scalar input of each element.
        u: (H,) input weights of x.  W: (L-1, H, H) and b: (L-1, H) hidden layers.
        w: (H,) output weights.  alpha: confinement (adds ``alpha * x**2 / 2``).
        activation: ``"softplus"``, ``"tanh"`` or ``"silu"``.

    Returns:
        ``(E, dE, d2E)``, each (N,): ``E``, ``dE/dx`` and ``d²E/dx²`` per element.
        Differentiable with respect to every tensor argument: first derivatives by the fused
        backward kernel, second and higher ones by autograd through the reference twin.
    """
    check_head_args(z, x, u, W, b, w, alpha, activation)
    return torch.ops.csm_ext.head_jets(z, x, u, W, b, w, float(alpha), activation)


# The fake kernels check shapes with torch._check, which records the relation (e.g. x has z's
# N rows) instead of comparing sizes in Python: under torch.compile(dynamic=True) a Python
# comparison would specialise the graph to one N; ranks and dtypes are static either way.
def _fake_check_shape(t: Tensor, name: str, shape: tuple) -> None:
    torch._check(t.dim() == len(shape),
                 lambda: f"{name} must have {len(shape)} dimensions; got shape {tuple(t.shape)}")
    for got, want in zip(t.shape, shape):
        torch._check(got == want, lambda: f"{name} must have shape {tuple(shape)}; got "
                                          f"{tuple(t.shape)}")


def _fake_check_head(z, u, W, b, w, activation, x=None) -> None:
    torch._check(activation in ACTIVATIONS,
                 lambda: f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    torch._check(z.dim() == 2, lambda: f"z must have shape (N, H); got {tuple(z.shape)}")
    H = z.shape[1]
    torch._check(W.dim() == 3, lambda: f"W must have shape (L-1, H, H); got {tuple(W.shape)}")
    L1 = W.shape[0]
    for name, t, shape in (("u", u, (H,)), ("W", W, (L1, H, H)), ("b", b, (L1, H)),
                           ("w", w, (H,))) + ((("x", x, (z.shape[0],)),) if x is not None else ()):
        _fake_check_shape(t, name, shape)
        torch._check(t.dtype == z.dtype,
                     lambda: f"{name} has dtype {t.dtype} but z has dtype {z.dtype}")


@torch.library.register_fake("csm_ext::head_jets")
def _head_jets_fake(z, x, u, W, b, w, alpha, activation):
    _fake_check_head(z, u, W, b, w, activation, x)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("csm_ext::head_jets_backward")
def _head_jets_backward_fake(grad_E, grad_dE, grad_d2E, z, x, u, W, b, w, alpha, activation,
                             weight_grads=True):
    _fake_check_head(z, u, W, b, w, activation, x)
    for name, g in (("grad_E", grad_E), ("grad_dE", grad_dE), ("grad_d2E", grad_d2E)):
        _fake_check_shape(g, name, tuple(x.shape))
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(u), torch.empty_like(W), torch.empty_like(b), torch.empty_like(w))


def _setup_context(ctx, inputs, output):
    z, x, u, W, b, w, alpha, activation = inputs
    # Only the inputs are kept: the backward recomputes the head's H-wide jets tile by tile.
    ctx.save_for_backward(z, x, u, W, b, w)
    ctx.alpha, ctx.activation = alpha, activation


def _head_jets_backward(ctx, grad_E, grad_dE, grad_d2E):
    z, x, u, W, b, w = ctx.saved_tensors
    grads = [g if g is not None else torch.zeros_like(x) for g in (grad_E, grad_dE, grad_d2E)]
    needs = ctx.needs_input_grad[:6]
    # A frozen head (sampling, a joint score in x only) skips the weight-gradient work.
    out = torch.ops.csm_ext.head_jets_backward(*grads, z, x, u, W, b, w, ctx.alpha,
                                               ctx.activation, any(needs[2:]))
    return (*(g if need else None for g, need in zip(out, needs)), None, None)


torch.library.register_autograd("csm_ext::head_jets", _head_jets_backward,
                                setup_context=_setup_context)


def _register_second_order(op: str, reference_fn, n_grads: int, outputs_of) -> None:
    """Register the autograd formula of the backward op ``op``, whose inputs are ``n_grads``
    incoming gradients followed by the arguments of ``reference_fn`` (the forward op's
    pure-PyTorch twin) and whose outputs are the gradients for those arguments at positions
    ``outputs_of``. Second derivatives come from autograd through the twin (its first
    derivatives equal the fused backward's, so theirs do too): slower than the fused
    first-order path, exact to rounding, and differentiable again when the caller builds a
    graph (``create_graph=True``)."""

    def setup_context(ctx, inputs, output):
        tensors = [t if torch.is_tensor(t) else None for t in inputs]
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.layout = [(i, t is not None) for i, t in enumerate(tensors)]
        ctx.inputs = [None if torch.is_tensor(t) else t for t in inputs]

    def backward(ctx, *grad_grads):
        create_graph = torch.is_grad_enabled()  # the caller builds a graph of this gradient
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if is_t else ctx.inputs[i] for i, is_t in ctx.layout]
        with torch.enable_grad():
            # Inputs already in a graph stay attached when a further derivative may be taken.
            args = [(a if (create_graph and a.requires_grad) else a.detach().requires_grad_(True))
                    if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            grads_in, fwd_args = args[:n_grads], args[n_grads:]
            outs = reference_fn(*fwd_args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            wrt = [fwd_args[i] for i in outputs_of]  # the backward op's outputs, in order
            first = torch.autograd.grad(outs, wrt, grads_in, create_graph=True, allow_unused=True)
            pairs = [(f, g) for f, g in zip(first, grad_grads) if f is not None and g is not None]
            leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
            if not pairs:
                return (None,) * len(args)
            second = iter(torch.autograd.grad([f for f, _ in pairs], leaves,
                                              [g for _, g in pairs], create_graph=create_graph,
                                              allow_unused=True))
        return tuple(next(second) if torch.is_tensor(a) and a.requires_grad else None
                     for a in args)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _jets_from_backward_args(z, x, u, W, b, w, alpha, activation, weight_grads=True):
    # With weight_grads=False the op's weight outputs are zeros that the first-order formula
    # above discards (it returns None for them), so no further derivative is taken of them.
    return reference.head_jets_ref(z, x, u, W, b, w, alpha, activation)


_register_second_order("csm_ext::head_jets_backward", _jets_from_backward_args, 3, range(6))


# ---------------------------------------------------------------- quadrature ops


def head_node_energies(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
                       activation: str, nodes: Tensor) -> Tensor:
    """Energies of every element at every quadrature node, fused: (N, G), entry (n, g) is
    ``E(z_n, t_g)``. Arguments as :func:`head_logz` (without ``log_weights``). For sampling
    (:func:`csm_ext.quadrature.sample_grid`); differentiable in z and the head weights."""
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes)
    _check_constant(nodes, "nodes")
    return torch.ops.csm_ext.head_node_energies(z, u, W, b, w, float(alpha), activation, nodes)


def head_logz(z: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor, alpha: float,
              activation: str, nodes: Tensor, log_weights: Tensor) -> Tensor:
    """Log-normalisers of the head's conditionals by quadrature, fused.

    ``log Z_n = logsumexp_g(−E(z_n, t_g) + log_weights_g)`` approximates
    ``log ∫ exp(−E(z_n, t)) dt`` over the support the nodes cover (see
    :func:`csm_ext.quadrature.rule`). Never stores anything N×G×H wide: the backward recomputes
    the node energies tile by tile.

    Args:
        z: (N, H) projected contexts.  u, W, b, w, alpha, activation: as :func:`head_jets`.
        nodes: (G,) quadrature nodes, G >= 2.  log_weights: (G,) their log-weights.
            Both are constants of the rule (no gradient flows to them; passing tensors that
            require grad is an error).

    Returns:
        (N,) ``log Z``, differentiable in z and the head weights (second derivatives through
        the reference twin).
    """
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes, log_weights)
    _check_constant(nodes, "nodes")
    _check_constant(log_weights, "log_weights")
    return torch.ops.csm_ext.head_logz(z, u, W, b, w, float(alpha), activation, nodes,
                                       log_weights)


def _check_constant(t: Tensor, name: str) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but the quadrature ops treat it as a constant "
                         f"of the rule and return no gradient for it; pass {name}.detach()")


@torch.library.register_fake("csm_ext::head_node_energies")
def _node_energies_fake(z, u, W, b, w, alpha, activation, nodes):
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes)
    return z.new_empty((z.shape[0], nodes.shape[0]))


@torch.library.register_fake("csm_ext::head_logz")
def _logz_fake(z, u, W, b, w, alpha, activation, nodes, log_weights):
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes, log_weights)
    return z.new_empty((z.shape[0],))


def _weight_grads_fake(z, u, W, b, w):
    return (torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(u),
            torch.empty_like(W), torch.empty_like(b), torch.empty_like(w))


@torch.library.register_fake("csm_ext::head_node_energies_backward")
def _node_energies_backward_fake(grad_E, z, u, W, b, w, alpha, activation, nodes):
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes)
    if tuple(grad_E.shape) != (z.shape[0], nodes.shape[0]):
        raise ValueError(f"grad_E must have shape {(z.shape[0], nodes.shape[0])}; got "
                         f"{tuple(grad_E.shape)}")
    return _weight_grads_fake(z, u, W, b, w)


@torch.library.register_fake("csm_ext::head_logz_backward")
def _logz_backward_fake(grad_logz, logz, z, u, W, b, w, alpha, activation, nodes, log_weights):
    check_quadrature_args(z, u, W, b, w, alpha, activation, nodes, log_weights)
    for name, t in (("grad_logz", grad_logz), ("logz", logz)):
        if tuple(t.shape) != (z.shape[0],):
            raise ValueError(f"{name} must have shape ({z.shape[0]},); got {tuple(t.shape)}")
    return _weight_grads_fake(z, u, W, b, w)


def _node_energies_setup(ctx, inputs, output):
    z, u, W, b, w, alpha, activation, nodes = inputs
    ctx.save_for_backward(z, u, W, b, w, nodes)
    ctx.alpha, ctx.activation = alpha, activation


def _node_energies_backward(ctx, grad_E):
    z, u, W, b, w, nodes = ctx.saved_tensors
    grads = torch.ops.csm_ext.head_node_energies_backward(
        grad_E.contiguous(), z, u, W, b, w, ctx.alpha, ctx.activation, nodes)
    return (*grads, None, None, None)


def _logz_setup(ctx, inputs, output):
    z, u, W, b, w, alpha, activation, nodes, log_weights = inputs
    # Only the inputs and log Z (N,) are kept: the backward recomputes the node energies.
    ctx.save_for_backward(output, z, u, W, b, w, nodes, log_weights)
    ctx.alpha, ctx.activation = alpha, activation


def _logz_backward(ctx, grad_logz):
    logz, z, u, W, b, w, nodes, log_weights = ctx.saved_tensors
    grads = torch.ops.csm_ext.head_logz_backward(
        grad_logz.contiguous(), logz, z, u, W, b, w, ctx.alpha, ctx.activation, nodes,
        log_weights)
    return (*grads, None, None, None, None)


torch.library.register_autograd("csm_ext::head_node_energies", _node_energies_backward,
                                setup_context=_node_energies_setup)
torch.library.register_autograd("csm_ext::head_logz", _logz_backward, setup_context=_logz_setup)
_register_second_order("csm_ext::head_node_energies_backward",
                       reference.head_node_energies_ref, 1, range(5))


def _logz_from_backward_args(logz, z, u, W, b, w, alpha, activation, nodes, log_weights):
    # head_logz_backward's extra input `logz` is the forward's output: a function of the others,
    # so its own gradient is zero here and the reference recomputes it.
    return reference.head_logz_ref(z, u, W, b, w, alpha, activation, nodes, log_weights)


_register_second_order("csm_ext::head_logz_backward", _logz_from_backward_args, 1,
                       range(1, 6))
