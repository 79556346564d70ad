"""The energy head: the small network that alone sees x_d, evaluated with its x-derivatives."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops, reference

__all__ = ["EnergyHead", "BACKENDS"]

# How the jets are computed: the fused op, or one of its pure-PyTorch twins (for reference and
# comparison; all agree to rounding).
_JETS = {
    "fused": ops.head_jets,                    # csm_ext kernels
    "autograd": reference.head_jets_ref,       # double backward through the plain energy
    "eager": reference.head_jets_eager,        # hand-written forward-mode jets
    "func": reference.head_jets_func,          # torch.func nested jvp
}
BACKENDS = tuple(_JETS)
# EnergyHead.jets checks its inputs itself (the weights are its own, consistent by
# construction), so the fused path calls the op directly instead of re-checking everything in
# ops.head_jets; the C++ kernel checks again, cheaply.
_FUSED_JETS = torch.ops.csm_ext.head_jets


class EnergyHead(nn.Module):
    """Per-element energy ``E(c, x)`` of an autoregressive conditional, with ``dE/dx`` and
    ``d²E/dx²`` from one fused pass.

    ``z = A c + b0`` (a linear projection of the context), then ``layers`` hidden layers of
    width ``hidden``: ``h_1 = φ(z + u·x)``, ``h_{l+1} = φ(W_l h_l + b_l)``, and
    ``E = w·h_L + confine·x²/2``. The confinement keeps ``exp(-E)`` integrable in x. There is no
    additive output bias: the conditional ``q(x|c) ∝ exp(-E)`` does not depend on one.

    Args:
        context_dim: K, the width of the context vectors.
        hidden: H, the hidden width.  layers: L >= 1 hidden layers.
        activation: ``"softplus"``, ``"tanh"`` or ``"silu"``.
        confine: alpha >= 0.
        backend: ``"fused"`` (the csm_ext kernels), ``"autograd"`` (plain torch ops,
            differentiable twice; the reference), or ``"eager"`` / ``"func"`` (hand-written
            forward-mode jets / ``torch.func`` jvp; for comparisons). Settable later via
            ``head.backend``.

    Shapes: ``ctx`` is ``(*S, K)`` and ``x`` is ``(*S)``; outputs have the shape of ``x``.
    """

    def __init__(self, context_dim: int, hidden: int = 64, layers: int = 2,
                 activation: str = "softplus", confine: float = 0.01, backend: str = "fused"):
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be >= 1; got {context_dim}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1; got {hidden}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1; got {layers}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}; got {activation!r}")
        if not confine >= 0:
            raise ValueError(f"confine must be >= 0; got {confine}")
        self.context_dim, self.hidden, self.layers = context_dim, hidden, layers
        self.activation, self.confine = activation, float(confine)
        self.backend = backend
        self.proj = nn.Linear(context_dim, hidden)
        self.u = nn.Parameter(torch.empty(hidden))
        self.W = nn.Parameter(torch.empty(layers - 1, hidden, hidden))
        self.b = nn.Parameter(torch.empty(layers - 1, hidden))
        self.w = nn.Parameter(torch.empty(hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` layers (x enters with unit fan-in)."""
        bound = 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.u, -1.0, 1.0)
        nn.init.uniform_(self.W, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)
        nn.init.uniform_(self.w, -bound, bound)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {value!r}")
        self._backend = value

    def extra_repr(self) -> str:
        return (f"context_dim={self.context_dim}, hidden={self.hidden}, layers={self.layers}, "
                f"activation={self.activation!r}, confine={self.confine}, "
                f"backend={self.backend!r}")

    def jets(self, ctx: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(E, dE/dx, d²E/dx²)``, each with the shape of ``x``; ``ctx`` is ``(*x.shape, K)``."""
        if ctx.dim() < 1 or ctx.shape[-1] != self.context_dim:
            raise ValueError(f"ctx must have shape (*S, {self.context_dim}); got "
                             f"{tuple(ctx.shape)}")
        if tuple(ctx.shape[:-1]) != tuple(x.shape):
            raise ValueError(f"x must have shape {tuple(ctx.shape[:-1])} to match ctx "
                             f"{tuple(ctx.shape)}; got {tuple(x.shape)}")
        if x.dtype != self.u.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the head's parameters are "
                             f"{self.u.dtype}")
        if x.device != self.u.device or ctx.device != self.u.device:
            raise ValueError(f"x is on {x.device} and ctx on {ctx.device} but the head's "
                             f"parameters are on {self.u.device}")
        if ctx.dtype != self.u.dtype:
            raise ValueError(f"ctx has dtype {ctx.dtype} but the head's parameters are "
                             f"{self.u.dtype}")
        z = self.proj(ctx).reshape(-1, self.hidden)
        args = (z, x.reshape(-1), self.u, self.W, self.b, self.w, self.confine, self.activation)
        if self.backend == "fused":
            if z.device.type == "cuda" and not ops.cuda_kernels_available():
                ops.check_head_args(*args)  # raises the no-CUDA-kernels error
            out = _FUSED_JETS(*args)
        else:
            out = _JETS[self.backend](*args)
        return tuple(t.view(x.shape) for t in out)

    def _z(self, ctx: Tensor) -> Tensor:
        if ctx.dim() < 1 or ctx.shape[-1] != self.context_dim:
            raise ValueError(f"ctx must have shape (*S, {self.context_dim}); got "
                             f"{tuple(ctx.shape)}")
        return self.proj(ctx).reshape(-1, self.hidden)

    def node_energies(self, ctx: Tensor, nodes: Tensor) -> Tensor:
        """Energies at quadrature nodes: ``ctx`` (*S, K), ``nodes`` (G,) → (*S, G), entry
        ``[..., g] = E(c, t_g)``. Fused op for ``backend="fused"``, else the reference."""
        fn = ops.head_node_energies if self.backend == "fused" else \
            reference.head_node_energies_ref
        E = fn(self._z(ctx), self.u, self.W, self.b, self.w, self.confine, self.activation,
               nodes.to(self.u.dtype))
        return E.view(*ctx.shape[:-1], nodes.shape[0])

    def logz(self, ctx: Tensor, nodes: Tensor, log_weights: Tensor) -> Tensor:
        """Log-normalisers ``log ∫ exp(−E(c, t)) dt`` by quadrature (nodes (G,), log-weights
        (G,); see :func:`csm_ext.quadrature.rule`): ``ctx`` (*S, K) → (*S). Fused op for
        ``backend="fused"``, else the reference (which stores (N, G, H))."""
        fn = ops.head_logz if self.backend == "fused" else reference.head_logz_ref
        out = fn(self._z(ctx), self.u, self.W, self.b, self.w, self.confine, self.activation,
                 nodes.to(self.u.dtype), log_weights.to(self.u.dtype))
        return out.view(ctx.shape[:-1])

    def forward(self, ctx: Tensor, x: Tensor) -> Tensor:
        """The energy E, with the shape of ``x``."""
        return self.jets(ctx, x)[0]

    def score(self, ctx: Tensor, x: Tensor) -> Tensor:
        """The conditional score ``s = -dE/dx``, with the shape of ``x``."""
        return -self.jets(ctx, x)[1]
