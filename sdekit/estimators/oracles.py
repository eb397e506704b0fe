"""The canonical objectives f and their exact expectations E_q[f(z)], whose autograd gradient is the oracle.

    quadratic    f(z) = sum_i (z_i - c_i)^2        c = linspace(-0.5, 0.5, d)
    exponential  f(z) = exp(sum_i a_i z_i)         a = linspace(0.05, 0.2, d)
    sinusoidal   f(z) = sum_i sin(w_i z_i)         w = linspace(0.5, 1.5, d)

Coefficients differ across coordinates so that f also separates the outcomes of a categorical.
Closed forms use each family's moments, moment generating function or characteristic function;
differentiating the closed form with autograd (exactly, no sampling) gives d/dtheta E_q[f].
For Categorical and Concrete the reference is the categorical expectation sum_k p_k f(e_k); for
Bernoulli and RelaxedBernoulli the Bernoulli expectation.

Objectives the pathwise estimator cannot differentiate (NONSMOOTH), with c = linspace(-0.5, 0.5, d):

    floor        f(z) = sum_i floor(z_i)              autograd: gradient 0 almost everywhere
    indicator    f(z) = sum_i 1[z_i > c_i]            autograd: no gradient path at all
    jump         f(z) = sum_i (z_i + 1[z_i > c_i])    autograd: sees the slope, misses the jumps

Their expectations need only the marginal CDFs F_i: E[1(z > c)] = 1 - F(c) and
E[floor z] = sum_{k >= 1} (1 - F(k)) - sum_{k <= 0} F(k); closed forms exist for the Gaussian, Laplace,
Logistic and Exponential families. For N(mu, sigma^2), d/dmu E[floor z] = sum_k phi((k - mu) / sigma) / sigma,
which by Poisson summation is 1 + 2 sum_m exp(-2 pi^2 m^2 sigma^2) cos(2 pi m mu) (1 to 6e-9 at sigma = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .families import Bernoulli, Categorical, Exponential, Family, Gamma, GaussianDiag, GaussianFull, Laplace, Logistic

__all__ = ["Objective", "OBJECTIVES", "NONSMOOTH", "make_objective", "expectation", "exact_gradient",
           "marginal_cdf", "floor_gradient_gaussian"]

OBJECTIVES = ("quadratic", "exponential", "sinusoidal")
NONSMOOTH = ("floor", "indicator", "jump")


@dataclass(frozen=True)
class Objective:
    """f: (n, d) -> (n,), one of OBJECTIVES or NONSMOOTH, with its coefficient vector coef: (d,)."""

    name: str
    coef: Tensor

    def __call__(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.coef.numel():
            raise ValueError(f"objective {self.name!r} has d={self.coef.numel()}, got z of shape {tuple(z.shape)}")
        if self.name == "quadratic":
            return ((z - self.coef) ** 2).sum(-1)
        if self.name == "exponential":
            return torch.exp((z * self.coef).sum(-1))
        if self.name == "sinusoidal":
            return torch.sin(z * self.coef).sum(-1)
        if self.name == "floor":
            return torch.floor(z).sum(-1)
        step = (z > self.coef).to(z.dtype)        # a comparison: autograd records no path through it
        return step.sum(-1) if self.name == "indicator" else (z + step).sum(-1)


def make_objective(name: str, d: int, dtype=torch.float64) -> Objective:
    ranges = {"quadratic": (-0.5, 0.5), "exponential": (0.05, 0.2), "sinusoidal": (0.5, 1.5),
              "floor": (0.0, 0.0), "indicator": (-0.5, 0.5), "jump": (-0.5, 0.5)}
    if name not in ranges:
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES + NONSMOOTH}")
    lo, hi = ranges[name]
    coef = torch.linspace(lo, hi, d, dtype=dtype) if d > 1 else torch.tensor([(lo + hi) / 2], dtype=dtype)
    return Objective(name, coef)


def _moments(fam: Family, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and variance: two (d,)."""
    d = fam.d
    if isinstance(fam, GaussianFull):
        return theta[:d], torch.diagonal(fam.covariance(theta))
    if isinstance(fam, GaussianDiag):
        return theta[:d], theta[d:] ** 2
    if isinstance(fam, Laplace):
        return theta[:d], 2 * theta[d:] ** 2
    if isinstance(fam, Logistic):
        return theta[:d], (math.pi * theta[d:]) ** 2 / 3
    if isinstance(fam, Exponential):
        return 1 / theta, 1 / theta ** 2
    if isinstance(fam, Gamma):
        return theta[:d] / theta[d:], theta[:d] / theta[d:] ** 2
    raise ValueError(f"no moments for family {fam.name!r}")


def _log_mgf(fam: Family, theta: Tensor, t: Tensor) -> Tensor:
    """log E[exp(t . z)] for an independent-coordinate family (summed over d); t: (d,)."""
    d = fam.d
    if isinstance(fam, GaussianDiag):
        return (t * theta[:d] + 0.5 * (t * theta[d:]) ** 2).sum()
    if isinstance(fam, Laplace):
        b = theta[d:]
        _check(fam, (t * b).abs() < 1, "|a| < 1/scale")
        return (t * theta[:d] - torch.log1p(-(b * t) ** 2)).sum()
    if isinstance(fam, Logistic):
        x = math.pi * theta[d:] * t
        _check(fam, (theta[d:] * t).abs() < 1, "|a| < 1/scale")
        return (t * theta[:d] + torch.log(x / torch.sin(x))).sum()
    if isinstance(fam, Exponential):
        _check(fam, t < theta, "a < rate")
        return (torch.log(theta) - torch.log(theta - t)).sum()
    if isinstance(fam, Gamma):
        alpha, beta = theta[:d], theta[d:]
        _check(fam, t < beta, "a < rate")
        return (alpha * (torch.log(beta) - torch.log(beta - t))).sum()
    raise ValueError(f"no moment generating function for family {fam.name!r}")


def _check(fam: Family, ok: Tensor, what: str) -> None:
    if not bool(ok.all()):
        raise ValueError(f"E[exp(a.z)] is infinite for {fam.name} at these parameters: needs {what}")


def _sin_mean(fam: Family, theta: Tensor, w: Tensor) -> Tensor:
    """sum_i E[sin(w_i z_i)] = sum_i Im E[exp(i w_i z_i)]; w: (d,)."""
    d = fam.d
    if isinstance(fam, (GaussianDiag, GaussianFull)):
        m, v = _moments(fam, theta)
        return (torch.sin(w * m) * torch.exp(-0.5 * w ** 2 * v)).sum()
    if isinstance(fam, Laplace):
        return (torch.sin(w * theta[:d]) / (1 + (theta[d:] * w) ** 2)).sum()
    if isinstance(fam, Logistic):
        x = math.pi * theta[d:] * w
        return (torch.sin(w * theta[:d]) * x / torch.sinh(x)).sum()
    if isinstance(fam, Exponential):
        return (theta * w / (theta ** 2 + w ** 2)).sum()
    if isinstance(fam, Gamma):
        alpha, beta = theta[:d], theta[d:]
        # (1 - i w / beta)^(-alpha) = r^(-alpha) exp(i alpha atan(w / beta)), r = |1 - i w / beta|
        return ((1 + (w / beta) ** 2) ** (-alpha / 2) * torch.sin(alpha * torch.atan(w / beta))).sum()
    raise ValueError(f"no characteristic function for family {fam.name!r}")


def marginal_cdf(fam: Family, theta: Tensor, x: Tensor) -> Tensor:
    """P(z_i <= x_i) per coordinate, differentiable in theta: (P,); x: (..., d) -> (..., d)."""
    d = fam.d
    if isinstance(fam, (GaussianDiag, GaussianFull)):
        m, v = _moments(fam, theta)
        return torch.special.ndtr((x - m) / v.sqrt())
    if isinstance(fam, Laplace):
        y = (x - theta[:d]) / theta[d:]
        return torch.where(y < 0, 0.5 * torch.exp(y.clamp_max(0)), 1 - 0.5 * torch.exp(-y.clamp_min(0)))
    if isinstance(fam, Logistic):
        return torch.sigmoid((x - theta[:d]) / theta[d:])
    if isinstance(fam, Exponential):
        return -torch.expm1(-theta * x.clamp_min(0))
    raise ValueError(f"no closed-form marginal CDF for family {fam.name!r} (non-smooth objectives need one)")


def _floor_mean(fam: Family, theta: Tensor) -> Tensor:
    """E[sum_i floor z_i] = sum_i [sum_{k >= 1} (1 - F_i(k)) - sum_{k <= 0} F_i(k)], over k within 60 sd of the mean."""
    m, v = _moments(fam, theta)
    lo = int(math.floor((m - 60 * v.sqrt()).min().item()))
    hi = int(math.ceil((m + 60 * v.sqrt()).max().item()))
    k = torch.arange(min(lo, 0), max(hi, 1) + 1, dtype=theta.dtype)
    F = marginal_cdf(fam, theta, k[:, None].expand(-1, fam.d))         # (n_k, d)
    return torch.where(k[:, None] >= 1, 1 - F, -F).sum()


def floor_gradient_gaussian(mu: float, sigma: float = 1.0) -> tuple[float, float]:
    """(d/dmu, d/dsigma) of E[floor z], z ~ N(mu, sigma^2), as the sums over integers k of
    phi((k - mu) / sigma) / sigma and phi((k - mu) / sigma) (k - mu) / sigma^2."""
    k = torch.arange(math.floor(mu - 40 * sigma), math.ceil(mu + 40 * sigma) + 1, dtype=torch.float64)
    y = (k - mu) / sigma
    phi = torch.exp(-0.5 * y ** 2) / math.sqrt(2 * math.pi)
    return (phi.sum() / sigma).item(), (phi * y).sum().item() / sigma


def expectation(fam: Family, f: Objective, theta: Tensor | None = None) -> Tensor:
    """E_{q_theta}[f(z)] in closed form, differentiable in theta: (P,) (default fam.theta0). Returns ()."""
    theta = fam.theta0 if theta is None else theta
    if f.coef.numel() != fam.d:
        raise ValueError(f"objective has d={f.coef.numel()} but family {fam.name!r} has d={fam.d}")
    if isinstance(fam, Categorical):      # also Concrete: the reference is the discrete expectation
        eye = torch.eye(fam.d, dtype=theta.dtype)
        return (fam.probs(theta) * f(eye)).sum()
    if isinstance(fam, Bernoulli):        # also RelaxedBernoulli: the reference is the Bernoulli expectation
        p = fam.probs(theta)
        if f.name == "exponential":       # independent coordinates: E[exp(a.z)] = prod_i (1 - p_i + p_i e^{a_i})
            return torch.prod(1 - p + p * torch.exp(f.coef))
        # every other objective is a sum of per-coordinate terms f_i(z_i), z_i in {0, 1}
        one, zero = torch.ones(1, fam.d, dtype=p.dtype), torch.zeros(1, fam.d, dtype=p.dtype)
        f1 = torch.stack([f(torch.where(torch.arange(fam.d) == i, one, zero))[0] - f(zero)[0] for i in range(fam.d)])
        return f(zero)[0] + (p * f1).sum()
    if f.name in NONSMOOTH:
        if f.name == "floor":
            return _floor_mean(fam, theta)
        tail = (1 - marginal_cdf(fam, theta, f.coef)).sum()
        return tail if f.name == "indicator" else tail + _moments(fam, theta)[0].sum()
    if f.name == "quadratic":
        m, v = _moments(fam, theta)
        return (v + (m - f.coef) ** 2).sum()
    if f.name == "exponential":
        if isinstance(fam, GaussianFull):
            a = f.coef
            return torch.exp(a @ theta[: fam.d] + 0.5 * a @ fam.covariance(theta) @ a)
        return torch.exp(_log_mgf(fam, theta, f.coef))
    return _sin_mean(fam, theta, f.coef)


def exact_gradient(fam: Family, f: Objective, theta: Tensor | None = None) -> Tensor:
    """d/dtheta E_{q_theta}[f(z)]: (P,), by autograd of the closed form (no sampling)."""
    theta = (fam.theta0 if theta is None else theta).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(expectation(fam, f, theta), theta)
    return grad
