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

from ._native import _C  # noqa: F401  (loading the library registers the ops)

ACTIVATIONS = ("softplus", "tanh", "silu")

__all__ = ["ACTIVATIONS", "head_jets", "check_head_args", "cuda_kernels_available"]


def cuda_kernels_available() -> bool:
    """True when this build of csm_ext contains CUDA kernels."""
    return bool(_C.WITH_CUDA)


def check_head_args(z: Tensor, x: Tensor, u: Tensor, W: Tensor, b: Tensor, w: Tensor,
                    alpha: float, activation: str) -> None:
    """Validate the arguments of :func:`head_jets`; raise ``ValueError`` naming the bad one."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (N, H) with H >= 1; got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be float32 or float64; got {z.dtype}")
    N, H = z.shape
    L1 = W.shape[0] if W.dim() == 3 else -1
    expected = {"x": (N,), "u": (H,), "W": (L1, H, H), "b": (L1, H), "w": (H,)}
    for name, t in (("x", x), ("u", u), ("W", W), ("b", b), ("w", w)):
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


@torch.library.register_fake("csm_ext::head_jets")
def _head_jets_fake(z, x, u, W, b, w, alpha, activation):
    check_head_args(z, x, u, W, b, w, alpha, activation)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("csm_ext::head_jets_backward")
def _head_jets_backward_fake(grad_E, grad_dE, grad_d2E, z, x, u, W, b, w, alpha, activation):
    check_head_args(z, x, u, W, b, w, alpha, activation)
    for name, g in (("grad_E", grad_E), ("grad_dE", grad_dE), ("grad_d2E", grad_d2E)):
        if g.shape != x.shape:
            raise ValueError(f"{name} must have shape {tuple(x.shape)}; got {tuple(g.shape)}")
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
    gz, gx, gu, gW, gb, gw = torch.ops.csm_ext.head_jets_backward(
        *grads, z, x, u, W, b, w, ctx.alpha, ctx.activation)
    return gz, gx, gu, gW, gb, gw, None, None


torch.library.register_autograd("csm_ext::head_jets", _head_jets_backward,
                                setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    *tensors, alpha, activation = inputs
    ctx.save_for_backward(*tensors)
    ctx.alpha, ctx.activation = alpha, activation


def _head_jets_double_backward(ctx, *grad_grads):
    """Backward of ``head_jets_backward``: the second derivatives of the head.

    Computed by autograd through the reference twin (the fused op's first derivatives equal the
    reference's, so their derivatives do too). Slower than the fused first-order path, exact to
    rounding, and differentiable again when the caller asks for a graph (``create_graph=True``).
    """
    from .reference import head_jets_ref

    create_graph = torch.is_grad_enabled()  # True when the caller builds a graph of this grad
    with torch.enable_grad():
        # Inputs already in a graph stay attached when a further derivative may be taken.
        leaves = [t if (create_graph and t.requires_grad) else t.detach().requires_grad_(True)
                  for t in ctx.saved_tensors]
        gE, gdE, gd2E, z, x, u, W, b, w = leaves
        jets = head_jets_ref(z, x, u, W, b, w, ctx.alpha, ctx.activation)
        first = torch.autograd.grad(jets, (z, x, u, W, b, w), (gE, gdE, gd2E),
                                    create_graph=True, allow_unused=True)
        pairs = [(f, g) for f, g in zip(first, grad_grads) if f is not None and g is not None]
        if not pairs:
            return (None,) * (len(leaves) + 2)
        second = torch.autograd.grad([f for f, _ in pairs], leaves, [g for _, g in pairs],
                                     create_graph=create_graph, allow_unused=True)
    return (*second, None, None)


torch.library.register_autograd("csm_ext::head_jets_backward", _head_jets_double_backward,
                                setup_context=_backward_setup_context)
