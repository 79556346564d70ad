"""MADE-CSM: a MADE context network followed by the shared energy head (docs/ARCHITECTURE.md, "The model split").

For x of shape (B, D) the MADE maps x to contexts c of shape (B, D, K) where c[:, d] depends on
x_<d only (in the model's autoregressive order); the :class:`~csm_ext.EnergyHead` then gives the
energies E_d = head(c_d, x_d), the unnormalised negative log-conditionals
q(x_d | x_<d) ∝ exp(−E_d), with their first and second derivatives in x_d.

Masks: the input unit of dimension d has degree m(d) ∈ {1..D} (its position in the order);
hidden units get degrees in [1, D−1] and connect to units of the previous layer with degree
≤ theirs (non-strict); the K outputs of dimension d connect to last-layer units of degree
< m(d) (strict). So the first dimension in the order gets a context made of biases only.
"""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..head import EnergyHead
from .base import ARCSM


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` (out_features, in_features).

    The mask is not part of the ``state_dict``: the model rebuilds it from its config. State
    dicts written before that (csm_ext 0.1.0 checkpoints) still load: their ``mask`` entry is
    taken over (it is the mask the weights were trained with) instead of being rejected."""

    def __init__(self, in_features, out_features, mask):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "mask"
        if key in state_dict:  # old format: load_state_dict passes a copy, so pop is local
            old = state_dict.pop(key)
            if tuple(old.shape) != tuple(self.mask.shape):
                error_msgs.append(f"size mismatch for {key}: copying a mask of shape "
                                  f"{tuple(old.shape)}, the model's is {tuple(self.mask.shape)}")
            else:
                with torch.no_grad():
                    self.mask.copy_(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def _resolve_order(order, dim, generator):
    """``order[i]`` = the dimension generated i-th."""
    if order is None or (isinstance(order, str) and order == "natural"):
        return torch.arange(dim)
    if isinstance(order, str):
        if order != "random":
            raise ValueError(f"order must be None, 'natural', 'random' or a permutation; got {order!r}")
        return torch.randperm(dim, generator=generator)
    order = torch.as_tensor(list(order), dtype=torch.long)
    if order.shape != (dim,) or not torch.equal(order.sort().values, torch.arange(dim)):
        raise ValueError(f"order must be a permutation of range({dim}); got {order.tolist()}")
    return order


class MADENet:
    """The MADE context network, shared by every model built on it (a mixin for ``nn.Module``).

    :meth:`_build_made` registers the masked layers and the order on the module; the model then
    gets ``P`` outputs per dimension, ``out[:, d]`` depending on ``x_<d`` only (in the order):
    :class:`MADECSM` uses them as the head's context (P = K), the maximum-likelihood baselines
    as the parameters of a normalised conditional. The registered names (``order``,
    ``degrees``, ``hidden.*``, ``out``, ``direct``) are the state-dict keys of the checkpoints.

    Optional conditioning (``cond_dim > 0``): an input ``cond`` (B, cond_dim) that every output
    may see, through an unmasked ``nn.Linear(cond_dim, H1)`` added to the first hidden layer's
    pre-activation (to the outputs when there are no hidden layers), registered as ``cond_in``;
    its hidden degrees start at 0 (units that see cond alone), so that every output, the first
    dimension's too, depends on cond.
    Off by default (``cond_dim=0``: no ``cond_in``, the state-dict keys above only); the methods
    below take ``cond=None`` then.
    """

    def _build_made(self, dim, hidden_sizes, per_dim, order, direct, seed, cond_dim=0):
        """Register the masks and layers; returns ``(order, hidden_sizes)`` as resolved."""
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive; got {hidden_sizes}")
        order = _resolve_order(order, dim, torch.Generator().manual_seed(seed))
        # The hidden degrees get a generator of their own, so they do not depend on whether the
        # order was drawn here ("random") or given as the list that ``config`` stores: a model
        # rebuilt from its config has the same masks (checkpoints do not store them).
        g = torch.Generator().manual_seed(seed)
        self._made_dim, self._per_dim = dim, per_dim
        self.register_buffer("order", order)
        deg_in = torch.empty(dim, dtype=torch.long)
        deg_in[order] = torch.arange(1, dim + 1)
        self.register_buffer("degrees", deg_in)  # degree (1-based position) of each dimension

        if not isinstance(cond_dim, int) or isinstance(cond_dim, bool) or cond_dim < 0:
            raise ValueError(f"cond_dim must be an int >= 0; got {cond_dim!r}")
        layers, prev = [], deg_in
        for h in hidden_sizes:
            # A conditional net also gets hidden units of degree 0: they see cond only, and so
            # give the first dimension in the order a context that depends on cond.
            lo = 0 if cond_dim else min(int(prev.min()), dim - 1)
            deg = torch.randint(lo, dim, (h,), generator=g) if dim > 1 else torch.zeros(h, dtype=torch.long)
            layers.append(MaskedLinear(len(prev), h, (deg[:, None] >= prev[None, :])))
            prev = deg
        self.hidden = nn.ModuleList(layers)
        deg_out = deg_in.repeat_interleave(per_dim)  # output unit (d, k) -> index d*P + k
        self.out = MaskedLinear(len(prev), dim * per_dim, deg_out[:, None] > prev[None, :])
        self.direct = (MaskedLinear(dim, dim * per_dim, deg_out[:, None] > deg_in[None, :])
                       if direct else None)
        self._cond_dim = cond_dim
        if cond_dim:  # unmasked: cond is visible to every output
            self.cond_in = nn.Linear(cond_dim, hidden_sizes[0] if hidden_sizes else dim * per_dim)
        else:
            self.cond_in = None
        return order, hidden_sizes

    def _cond_term(self, cond):
        """The conditioning input's contribution (B, H1) (or (B, D·P) without hidden layers),
        or None for an unconditional net; checks that cond is given exactly when expected."""
        k = getattr(self, "_cond_dim", 0)
        if cond is None:
            if k:
                raise ValueError(f"this model is conditional (cond_dim={k}): pass cond, a "
                                 f"tensor of shape (B, {k})")
            return None
        if not k:
            raise ValueError("cond was given but this model is unconditional (cond_dim=0)")
        if not torch.is_tensor(cond) or cond.dim() != 2 or cond.shape[1] != k:
            raise ValueError(f"cond must have shape (B, {k}); got "
                             f"{tuple(getattr(cond, 'shape', ()))}")
        return self.cond_in(cond)

    def _trunk(self, x, cond=None):
        c = self._cond_term(cond)
        h = x
        for i, layer in enumerate(self.hidden):
            a = layer(h)
            h = F.relu(a if (i or c is None) else a + c)
        return h

    def _made_outputs(self, x, cond=None):
        """All outputs (B, D, P) of the flat input x (B, D) (and cond (B, cond_dim) for a
        conditional net)."""
        c = self.out(self._trunk(x, cond))
        if self.direct is not None:
            c = c + self.direct(x)
        if cond is not None and not self.hidden:
            c = c + self.cond_in(cond)
        return c.view(x.shape[0], self._made_dim, self._per_dim)

    def _outputs_of(self, d, h, x, cond=None):
        """Dimension d's outputs (B, P) from the trunk's last hidden layer h and x (and, with
        no hidden layers, cond)."""
        rows = slice(d * self._per_dim, (d + 1) * self._per_dim)
        o = self.out
        c = F.linear(h, o.weight[rows] * o.mask[rows], o.bias[rows])
        if self.direct is not None:
            dr = self.direct
            c = c + F.linear(x, dr.weight[rows] * dr.mask[rows], dr.bias[rows])
        if cond is not None and not self.hidden:
            ci = self.cond_in
            c = c + F.linear(cond, ci.weight[rows], ci.bias[rows])
        return c

    def _made_sweep(self, x, progress=False, cond=None):
        """For ancestral sampling: yield ``(d, out_d)`` (B, P) for each dimension d in the
        order; the caller sets ``x[:, d]`` before the next step. The first layer's
        pre-activations are updated as each x_d is set (O(H) per dimension) instead of
        recomputing the trunk from x."""
        order = self.order.tolist()
        bar = tqdm(order, desc="sampling", unit="dim", disable=not progress, leave=False)
        c = self._cond_term(cond)  # checks cond
        if not self.hidden:
            for d in bar:
                yield d, self._outputs_of(d, x, x, cond)
            return
        first = self.hidden[0]
        w1 = first.weight * first.mask  # (H1, D)
        pre = F.linear(x, w1, first.bias)
        if c is not None:
            pre = pre + c
        for d in bar:
            h = F.relu(pre)
            for layer in self.hidden[1:]:
                h = F.relu(layer(h))
            old = x[:, d].clone()
            yield d, self._outputs_of(d, h, x)
            pre += (x[:, d] - old)[:, None] * w1[:, d]


class MADECSM(MADENet, ARCSM):
    """Autoregressive score-matching model with a MADE context network.

    Args:
        dim: D, the data dimension (inputs are flat, shape (B, D)).
        hidden_sizes: widths of the MADE hidden layers (ReLU), e.g. ``(512,)``; ``()`` gives a
            linear autoregressive context.
        context_dim: K, context features per dimension (MADE output (B, D, K)).
        head_hidden, head_layers, activation, confine, backend: the :class:`EnergyHead`.
        order: None (natural), ``"random"`` (seeded by ``seed``) or a permutation of range(D).
        direct: add strictly masked direct input→context connections (as in the MADE paper).
        seed: seeds the hidden degrees (and a random order).
        support: ``(lo, hi)``, the interval of every conditional (needed by the likelihood and
            the grid sampler; settable later as ``model.support``).
        objective, mle_weight: the training objective of ``loss``/``forward`` (see
            :meth:`ARCSM.loss`).
        cond_dim: width of an optional conditioning input (0: none). A conditional model
            ``q(x | cond)`` sees ``cond`` (B, cond_dim) unmasked in its first hidden layer; every
            method that computes contexts then takes ``cond=`` (and refuses a missing one).

    Everything beyond the context network (likelihood, joint score, objectives, samplers) is
    :class:`~csm_ext.models.ARCSM`'s.

    The masks are buffers outside the ``state_dict``: ``from_config(model.config)`` rebuilds
    them identically (the config holds the order as a list, and the seed).
    """

    def __init__(self, dim, hidden_sizes=(512,), context_dim=16, head_hidden=64, head_layers=2,
                 activation="softplus", order=None, confine=0.01, backend="fused", direct=False,
                 seed=0, support=None, objective="csm", mle_weight=1.0, cond_dim=0):
        super().__init__()
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive int; got {context_dim!r}")
        self.dim, self.context_dim = dim, context_dim
        order, hidden_sizes = self._build_made(dim, hidden_sizes, context_dim, order, direct, seed,
                                               cond_dim)
        self.head = EnergyHead(context_dim, hidden=head_hidden, layers=head_layers,
                               activation=activation, confine=confine, backend=backend)
        self.config = dict(dim=dim, hidden_sizes=list(hidden_sizes), context_dim=context_dim,
                           head_hidden=head_hidden, head_layers=head_layers, activation=activation,
                           order=order.tolist(), confine=float(confine), backend=backend,
                           direct=bool(direct), seed=seed)
        if cond_dim:  # unconditional configs keep their keys (as in older checkpoints)
            self.config["cond_dim"] = cond_dim
        self._init_common(support, objective, mle_weight)

    def context(self, x, cond=None):
        """Contexts (B, D, K); ``c[:, d]`` depends on ``x[:, j]`` only for j before d in the
        order (and on ``cond`` (B, cond_dim), all of it, for a conditional model)."""
        x = self._flatten(x)
        self._check_cond_batch(x, cond)
        return self._made_outputs(x, cond)

    def context_at(self, x, d, cond=None):
        """The context (B, K) of dimension ``d`` alone (computes only its K output units)."""
        self._check_cond_batch(x, cond)
        return self._context_of(d, self._trunk(x, cond), x, cond)

    def _context_of(self, d, h, x, cond=None):
        """Dimension d's context (B, K) from the trunk's last hidden layer h and x."""
        return self._outputs_of(d, h, x, cond)

    def _sweep(self, x, progress=False, cond=None):
        """Incremental contexts for sampling (see :meth:`MADENet._made_sweep`)."""
        self._check_cond_batch(x, cond)
        return self._made_sweep(x, progress, cond)
