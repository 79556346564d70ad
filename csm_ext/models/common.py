"""What every autoregressive model of csm_ext shares, energy model or not: :class:`ARModel`.

Both families of models derive from it: :class:`~csm_ext.models.ARCSM` (unnormalised energy
conditionals, normalised by quadrature) and :class:`~csm_ext.models.mixture.MixtureAR` (the
maximum-likelihood baselines with closed-form conditionals). The members here are the ones that
do not care how a conditional is parametrised: the support (the interval every conditional is a
proper density on), the rebuild from a config, the input-shape hooks, the reduction of a
per-sample loss and bits/dim from ``log_prob``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..loss import reduce

__all__ = ["ARModel"]


class ARModel(nn.Module):
    """Base of every autoregressive model: ``dim`` (D, the flat data dimension), an ``order``
    buffer (flat indices in generation order), a ``config`` dict (the constructor's arguments,
    so :meth:`from_config` rebuilds the model) and ``log_prob(x, nodes=None) -> (B,)``."""

    dim: int
    config: dict

    @classmethod
    def from_config(cls, config: dict) -> "ARModel":
        """Rebuild a model from ``model.config`` (as stored in checkpoints)."""
        return cls(**config)

    # ---------------------------------------------------------------- support

    @property
    def support(self) -> tuple[float, float] | None:
        """``(lo, hi)``: the interval every conditional is defined on (None: not set). The
        likelihood is that of a proper density on this box; data outside it is an error.
        Settable; stored in the config (and so in checkpoints)."""
        s = self.config.get("support")
        return None if s is None else (float(s[0]), float(s[1]))

    @support.setter
    def support(self, value) -> None:
        if value is not None:
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"support must be (lo, hi) or None; got {value!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"support must be (lo, hi) with finite lo < hi; got {value!r}")
            value = [lo, hi]
        self.config["support"] = value

    def _require_support(self) -> tuple[float, float]:
        if self.support is None:
            raise ValueError(f"{type(self).__name__} has no support: set model.support = "
                             "(lo, hi), the interval its conditionals live on (images: the data "
                             "range widened by 4 sigma of the smoothing noise)")
        return self.support

    def _check_in_support(self, x: Tensor) -> None:
        lo, hi = self._require_support()
        x = x.detach()
        if x.numel() and not (float(x.min()) >= lo and float(x.max()) <= hi):
            raise ValueError(f"x has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], "
                             f"outside the model's support [{lo:g}, {hi:g}]: its density is "
                             "zero there (widen model.support, or clamp the data yourself)")

    # ---------------------------------------------------------------- shapes (hooks)

    def _flatten(self, x: Tensor) -> Tensor:
        """x in the model's input shape → (B, D) (checks the shape)."""
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}); got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return x

    def _unflatten(self, x: Tensor, like: str = "flat") -> Tensor:
        """(n, D) → the model's native sample shape (``like="flat"``: unchanged)."""
        return x

    # ---------------------------------------------------------------- likelihood

    # Per-sample values (B,) reduced by "mean", "sum" or "none" (csm_ext.loss.reduce).
    _reduce = staticmethod(reduce)

    def bits_per_dim(self, x: Tensor, nodes: int | None = None, cond: Tensor | None = None
                     ) -> Tensor:
        """``−log_prob(x) / (D·ln 2)`` per sample, (B,). This is the density of the data in the
        model's space (for images: smoothed with the training noise, after the affine or logit
        map); compare numbers only in the same space. ``cond``: the conditioning input of a
        conditional model (passed on to ``log_prob``)."""
        lp = self.log_prob(x, nodes) if cond is None else self.log_prob(x, nodes, cond=cond)
        return -lp / (self.dim * math.log(2.0))
