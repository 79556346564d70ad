"""2-D toy densities with exact log-densities and exact samplers.

Every toy is a small object with

- ``sample(n, generator=None) -> Tensor (n, 2)`` (float32 unless ``dtype`` is given),
- ``log_prob(x) -> Tensor (n,)`` for ``x`` of shape ``(n, 2)``: the normalised log-density,
- ``range``: a box ``(lo, hi)`` that holds essentially all of the mass (for plots and clipping).

All densities are smooth (the CSM objective needs that, see docs/ARCHITECTURE.md, "The objective and the data"); the checkerboard is a
uniform checkerboard convolved with a small Gaussian, whose density is still exact in closed form.
The two spirals' density is a 1-D integral along the curve, evaluated by a fine quadrature
(``quad_points``), accurate far beyond plotting or testing precision.
"""
import math

import torch

LOG_2PI = math.log(2 * math.pi)


def _randn(n, d, generator, dtype):
    return torch.randn(n, d, generator=generator, dtype=dtype)


def _check_x(x):
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be a tensor of shape (n, 2), got {getattr(x, 'shape', type(x))}")
    return x


def _check_n(n):
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


class EightGaussians:
    """Equal mixture of 8 isotropic Gaussians (std ``std``) on a circle of radius ``radius``.

    Centers at angles k·π/4, k = 0..7 (so (radius, 0) is center 0).
    """

    name = "8gaussians"

    def __init__(self, radius=2.0, std=0.3):
        if radius <= 0 or std <= 0:
            raise ValueError(f"radius and std must be > 0, got radius={radius}, std={std}")
        self.radius, self.std = float(radius), float(std)
        a = torch.arange(8, dtype=torch.float64) * math.pi / 4
        self.centers = self.radius * torch.stack([a.cos(), a.sin()], 1)  # (8, 2)
        r = self.radius + 4 * self.std
        self.range = (-r, r)

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        k = torch.randint(0, 8, (n,), generator=generator)
        x = self.centers[k] + self.std * _randn(n, 2, generator, torch.float64)
        return x.to(dtype)

    def log_prob(self, x):
        x = _check_x(x)
        c = self.centers.to(x)
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # (n, 8)
        lp = -0.5 * d2 / self.std ** 2 - LOG_2PI - 2 * math.log(self.std) - math.log(8)
        return torch.logsumexp(lp, 1)

    def nearest_mode(self, x):
        """Index (n,) of the nearest center for each point of x (n, 2)."""
        return torch.cdist(_check_x(x).double(), self.centers).argmin(1)


class Checkerboard:
    """Uniform density on the 8 dark squares of a 4×4 board over [-2, 2]², smoothed by N(0, sigma²I).

    Square (i, j) (i, j in 0..3, lower-left corner (-2 + i, -2 + j)) is dark when i + j is even.
    With ``sigma > 0`` the density is the exact convolution, a sum of products of normal CDF
    differences; ``sigma = 0`` gives the raw piecewise-constant density (−inf outside).
    """

    name = "checkerboard"

    def __init__(self, sigma=0.05):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.squares = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0],
                                    dtype=torch.float64) - 2.0  # (8, 2) lower-left corners
        r = 2.0 + 4 * self.sigma
        self.range = (-r, r)

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        k = torch.randint(0, 8, (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        x = self.squares[k] + u + self.sigma * _randn(n, 2, generator, torch.float64)
        return x.to(dtype)

    def log_prob(self, x):
        x = _check_x(x)
        lo = self.squares.to(x)  # (8, 2)
        if self.sigma == 0:
            inside = ((x[:, None] >= lo) & (x[:, None] < lo + 1)).all(-1).any(1)
            return torch.where(inside, torch.full_like(x[:, 0], -math.log(8)),
                               torch.full_like(x[:, 0], -math.inf))
        # P(lo <= x - s*e < lo+1) per axis = Phi((x-lo)/s) - Phi((x-lo-1)/s), in log space for tails
        a = (x[:, None] - lo) / self.sigma          # (n, 8, 2)
        b = (x[:, None] - lo - 1) / self.sigma
        # log(Phi(a) - Phi(b)) with a > b, stable: log Phi(a) + log1p(-exp(log Phi(b) - log Phi(a)))
        la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
        lmass = la + torch.log1p(-torch.exp((lb - la).clamp(max=-1e-12)))
        # mirror for far-right tails, where both Phi are ~1: use Phi(-b) - Phi(-a)
        la2, lb2 = torch.special.log_ndtr(-b), torch.special.log_ndtr(-a)
        lmass2 = la2 + torch.log1p(-torch.exp((lb2 - la2).clamp(max=-1e-12)))
        lmass = torch.where(a + b > 0, lmass2, lmass)
        return torch.logsumexp(lmass.sum(-1), 1) - math.log(8)


class TwoSpirals:
    """Two interleaved spirals: t ~ U(0, 1), radius r(t) = r0 + (r1 - r0)·t, angle θ = turns·2π·t
    (+π for the second arm), plus isotropic N(0, noise²I).

    log_prob integrates the Gaussian kernel along the curve with a ``quad_points`` midpoint rule.
    """

    name = "2spirals"

    def __init__(self, noise=0.1, turns=1.25, r0=0.3, r1=2.5, quad_points=1024):
        if noise <= 0 or turns <= 0 or quad_points < 16:
            raise ValueError(f"need noise > 0, turns > 0, quad_points >= 16; "
                             f"got noise={noise}, turns={turns}, quad_points={quad_points}")
        self.noise, self.turns, self.r0, self.r1 = float(noise), float(turns), float(r0), float(r1)
        self.quad_points = int(quad_points)
        r = self.r1 + 4 * self.noise
        self.range = (-r, r)

    def _curve(self, t, arm):
        r = self.r0 + (self.r1 - self.r0) * t
        a = 2 * math.pi * self.turns * t + math.pi * arm
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], -1)

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        t = torch.rand(n, generator=generator, dtype=torch.float64)
        arm = torch.randint(0, 2, (n,), generator=generator).double()
        x = self._curve(t, arm) + self.noise * _randn(n, 2, generator, torch.float64)
        return x.to(dtype)

    def log_prob(self, x):
        x = _check_x(x)
        m = self.quad_points
        t = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        pts = torch.cat([self._curve(t, 0.0), self._curve(t, 1.0)]).to(x)  # (2m, 2)
        d2 = torch.cdist(x, pts) ** 2  # (n, 2m)
        lp = -0.5 * d2 / self.noise ** 2 - LOG_2PI - 2 * math.log(self.noise)
        return torch.logsumexp(lp, 1) - math.log(2 * m)


class Rings:
    """Concentric rings: pick ring k (weights proportional to radius), a uniform angle, then add
    isotropic N(0, noise²I). Exact density (modified Bessel function I0):

        p(x) = Σ_k w_k · exp(-(ρ - r_k)²/(2σ²)) · i0e(ρ r_k/σ²) / (2πσ²),   ρ = |x|.
    """

    name = "rings"

    def __init__(self, radii=(0.5, 1.0, 1.5, 2.0), noise=0.08):
        radii = [float(r) for r in radii]
        if not radii or min(radii) <= 0 or noise <= 0:
            raise ValueError(f"need positive radii and noise > 0, got radii={radii}, noise={noise}")
        self.radii = torch.tensor(radii, dtype=torch.float64)
        self.weights = self.radii / self.radii.sum()
        self.noise = float(noise)
        r = max(radii) + 4 * self.noise
        self.range = (-r, r)

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        a = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = self.radii[k, None] * torch.stack([a.cos(), a.sin()], 1)
        x = x + self.noise * _randn(n, 2, generator, torch.float64)
        return x.to(dtype)

    def log_prob(self, x):
        x = _check_x(x)
        rho = x.norm(dim=1, keepdim=True)  # (n, 1)
        r, s2 = self.radii.to(x), self.noise ** 2
        lp = (-0.5 * (rho - r) ** 2 / s2 + torch.log(torch.special.i0e(rho * r / s2))
              - LOG_2PI - math.log(s2) + torch.log(self.weights.to(x)))
        return torch.logsumexp(lp, 1)


class Funnel:
    """Neal's funnel in 2-D: x0 ~ N(0, v_std²), x1 | x0 ~ N(0, exp(x0)).

    The natural autoregressive order (x0 then x1) makes both conditionals Gaussian.
    """

    name = "funnel"

    def __init__(self, v_std=1.5):
        if v_std <= 0:
            raise ValueError(f"v_std must be > 0, got {v_std}")
        self.v_std = float(v_std)
        self.range = (-4 * self.v_std, 4 * self.v_std)

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        e = _randn(n, 2, generator, torch.float64)
        v = self.v_std * e[:, 0]
        return torch.stack([v, torch.exp(0.5 * v) * e[:, 1]], 1).to(dtype)

    def log_prob(self, x):
        x = _check_x(x)
        v, y = x[:, 0], x[:, 1]
        lv = -0.5 * (v / self.v_std) ** 2 - 0.5 * LOG_2PI - math.log(self.v_std)
        ly = -0.5 * y ** 2 * torch.exp(-v) - 0.5 * LOG_2PI - 0.5 * v
        return lv + ly


TOYS = {c.name: c for c in (EightGaussians, Checkerboard, TwoSpirals, Rings, Funnel)}


def get_toy(name, **kwargs):
    """Build a toy density by name (one of ``TOYS``: 8gaussians, checkerboard, 2spirals, rings, funnel)."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {sorted(TOYS)}")
    return TOYS[name](**kwargs)


class CorrelatedGaussian:
    """A correlated D-dimensional Gaussian N(0, Σ) with known autoregressive conditionals.

    Σ = L Lᵀ with L lower triangular (random, seeded). In the natural order the conditional
    x_d | x_<d is Gaussian with variance v_d = L_dd² and score s_d(x) = −ε_d / L_dd, ε = L⁻¹x.
    The CSM optimum is E[L] = −½ Σ_d 1/v_d (``csm_optimum``).
    """

    name = "gaussian"

    def __init__(self, dim=6, seed=0, offdiag=0.8, diag_range=(0.5, 1.5)):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        g = torch.Generator().manual_seed(seed)
        L = torch.randn(dim, dim, generator=g, dtype=torch.float64).tril(-1) * offdiag
        lo, hi = diag_range
        diag = lo + (hi - lo) * torch.rand(dim, generator=g, dtype=torch.float64)
        self.L = L + torch.diag(diag)
        self.dim = dim
        self.cov = self.L @ self.L.T
        self.variances = diag ** 2  # conditional variances v_d
        r = 4 * float(self.cov.diagonal().sqrt().max())
        self.range = (-r, r)

    @property
    def csm_optimum(self):
        """−½ Σ_d 1/v_d: the minimum expected CSM loss per sample."""
        return float(-0.5 * (1 / self.variances).sum())

    def sample(self, n, generator=None, dtype=torch.float32):
        _check_n(n)
        e = _randn(n, self.dim, generator, torch.float64)
        return (e @ self.L.T).to(dtype)

    def conditional_scores(self, x):
        """True s_d = ∂/∂x_d log p(x_d | x_<d), shape of x (n, D)."""
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {getattr(x, 'shape', None)}")
        L = self.L.to(x)
        e = torch.linalg.solve_triangular(L, x.T, upper=False).T
        return -e / L.diagonal()

    def log_prob(self, x):
        L = self.L.to(x)
        e = torch.linalg.solve_triangular(L, x.T, upper=False).T
        return (-0.5 * e.pow(2).sum(1) - L.diagonal().log().sum() - 0.5 * self.dim * LOG_2PI)
