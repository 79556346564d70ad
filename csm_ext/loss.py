"""The Composite Score Matching loss."""
from __future__ import annotations

from torch import Tensor

from .head import EnergyHead

__all__ = ["csm_loss", "csm_loss_from_jets", "reduce", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply a loss reduction (``"mean"``, ``"sum"``, ``"none"``) to a (B,) vector."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def csm_loss_from_jets(dE: Tensor, d2E: Tensor, reduction: str = "mean") -> Tensor:
    """CSM loss from the per-element derivatives of the energies.

    Per sample: ``Σ_{non-batch dims} (½·dE² − d2E)``. ``dE`` and ``d2E`` have shape (B, ...).
    ``reduction``: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` → (B,).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if dE.dim() == 0:
        raise ValueError("dE must have a batch dimension; got a 0-d tensor")
    per_element = 0.5 * dE * dE - d2E
    return reduce(per_element.reshape(per_element.shape[0], -1).sum(1), reduction)


def csm_loss(head: EnergyHead, ctx: Tensor, x: Tensor, reduction: str = "mean") -> Tensor:
    """Composite Score Matching loss of an autoregressive energy model.

    Args:
        head: the :class:`~csm_ext.EnergyHead` giving ``E_d = head(c_d, x_d)``.
        ctx: (B, ..., K) contexts, ``ctx[..., d, :]`` depending on ``x_<d`` only.
        x: (B, ...) the data.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample, shape (B,)).

    The per-sample loss is ``Σ_d ½·(E_d')² − E_d''`` with ``' = ∂/∂x_d``. Gradients flow to the
    head's parameters and to ``ctx`` (so the context network upstream trains).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, shape (B, ...); got a 0-d tensor")
    _, dE, d2E = head.jets(ctx, x)
    return csm_loss_from_jets(dE, d2E, reduction)
