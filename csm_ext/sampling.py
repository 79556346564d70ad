"""Per-dimension Langevin sampling for autoregressive energy models (the AR-CSM paper's sampler).

Generic over models: a model provides ``context_at(x, d) -> (n, K)`` (the context of flat
dimension d given the current x, depending on x_<d only) and an :class:`~csm_ext.EnergyHead`.
Dimensions are visited in the autoregressive order; for each, the context is computed once and
a 1-D Langevin chain runs on the head alone:

    x ← x − (ε_t / 2)·E'(c_d, x) + √ε_t · ξ,     ξ ~ N(0, 1),

with ε_t annealed geometrically from ``step_size·anneal`` to ``step_size`` over ``steps`` steps.
A 1-D chain rarely crosses between well-separated modes, so start it from a broad distribution
(``init="uniform"`` over the data range) and anneal: the large early steps spread the chains
over the modes in proportion to their basins, the small late ones settle them.
"""
import contextlib
import math

import torch
from tqdm.auto import tqdm

# Below this many head units per call (n · H) the chains run on one CPU thread: each call is
# microseconds of work, and waking a thread pool for it costs more than it saves (much more when
# the cores are shared with other processes).
SMALL_WORK = 32768


@contextlib.contextmanager
def threads_for(work, device):
    """Run the block on one CPU thread when ``work`` (head units per call) is below
    :data:`SMALL_WORK`."""
    if str(device).startswith("cpu") and work < SMALL_WORK and torch.get_num_threads() > 1:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(old)
    else:
        yield


def step_schedule(steps, step_size, anneal=1.0):
    """Step sizes ε_0..ε_{T-1}: geometric from ``step_size·anneal`` down to ``step_size``."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0; got {step_size}")
    if not anneal >= 1:
        raise ValueError(f"anneal must be >= 1 (ratio of first to last step size); got {anneal}")
    if steps == 1:
        return [float(step_size)]
    return [float(step_size * anneal ** (1 - t / (steps - 1))) for t in range(steps)]


def initial_points(n, dim, init, clip, generator, dtype, device):
    """Chain starting points (n, dim) from ``init`` ("uniform" over ``clip``, "normal", "zeros",
    or a tensor); ``None`` means "uniform" when ``clip`` is given, else "normal"."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be (lo, hi) with lo < hi; got {clip!r}")
    if torch.is_tensor(init):
        if init.shape != (n, dim):
            raise ValueError(f"init must have shape ({n}, {dim}); got {tuple(init.shape)}")
        return init.to(device=device, dtype=dtype).clone()
    init = init or ("uniform" if clip is not None else "normal")
    gdev = generator.device if generator is not None else "cpu"
    if init == "uniform":
        if clip is None:
            raise ValueError("init='uniform' needs clip=(lo, hi)")
        lo, hi = clip
        x = lo + (hi - lo) * torch.rand(n, dim, generator=generator, dtype=dtype, device=gdev)
    elif init == "normal":
        x = torch.randn(n, dim, generator=generator, dtype=dtype, device=gdev)
    elif init == "zeros":
        x = torch.zeros(n, dim, dtype=dtype)
    else:
        raise ValueError(f"init must be 'uniform', 'normal', 'zeros' or a tensor; got {init!r}")
    return x.to(device)


def _randn_like(x, generator):
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


@torch.no_grad()
def langevin_1d(head, ctx, x, steps, step_size, anneal=1.0, generator=None, temperature=1.0):
    """Run one batch of 1-D Langevin chains on the head: ctx (n, K), x (n,) → x (n,).

    The chains target q(x | c)^(1/temperature) ∝ exp(−E(c, x)/temperature)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    for eps in step_schedule(steps, step_size, anneal):
        dE = head.jets(ctx, x)[1]
        noise = _randn_like(x, generator)
        x = x - (0.5 * eps / temperature) * dE + math.sqrt(eps) * noise
    return x


@torch.no_grad()
def ar_langevin(context_at, head, x, order, steps, step_size, anneal=1.0, progress=True,
                generator=None, temperature=1.0):
    """Autoregressive Langevin sampling of x (n, D) (its columns are the chains' starting points).

    ``context_at(x, d)`` → (n, K) is called once per dimension d, in ``order``; returns x (n, D).
    ``temperature`` < 1 sharpens every conditional (q(x_d | x_<d)^(1/T)), as in AR models.
    """
    step_schedule(steps, step_size, anneal)  # validate before the loop
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    x = x.clone()
    for d in tqdm(order, desc="sampling", unit="dim", disable=not progress, leave=False):
        ctx = context_at(x, d)
        with threads_for(x.shape[0] * getattr(head, "hidden", 64), x.device):
            x[:, d] = langevin_1d(head, ctx, x[:, d], steps, step_size, anneal, generator,
                                  temperature)
    return x
